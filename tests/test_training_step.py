"""The training step (train.py's train_one_epoch and training/step.py): the loss of the main and
both aux heads on one set of targets, micro-batches (--micro-batch), the optimizer (--opt), the
memory format (--no-channels-last), fp16's loss scaling, and a loss that diverges."""
import csv
import re
import shutil

import pytest
import torch
from torch import nn

import train
from helpers import assert_clean_error, call, dataset_of, load, make_tree, train_argv
from inference import checkpoint as ckpt
from inference import images
from plumbing import device as dev
from plumbing import stopping
from training import data, run_state, schedule, step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("step") / "data", n_train=4, n_val=1)  # 12 images: 3 steps of 4


# ---------------------------------------------------------------------------------------------
# micro-batches
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("size,expected", [(0, [4]), (2, [2, 2]), (3, [3, 1]), (4, [4]), (9, [4])])
def test_micro_batches_split_the_step_into_shares_that_add_up(size, expected):
    images_, targets, labels = torch.arange(4.0).view(4, 1), torch.arange(4), torch.arange(4) + 10
    chunks = step.micro_batches(images_, targets, labels, size)
    assert [len(c.images) for c in chunks] == expected
    assert [c.share for c in chunks] == [n / 4 for n in expected]  # each chunk's loss x share: the batch mean
    assert [c.last for c in chunks] == [False] * (len(expected) - 1) + [True]
    assert torch.equal(torch.cat([c.labels for c in chunks]), labels)
    assert torch.equal(torch.cat([c.targets for c in chunks]), targets)


@pytest.mark.quick
def test_gradient_sync_waits_for_the_last_chunk():
    synced = []

    class Wrapped(nn.Module):  # what DistributedDataParallel offers
        def no_sync(self):
            synced.append("held")
            return torch.no_grad()

    first, last = step.micro_batches(torch.zeros(4, 1), torch.zeros(4), torch.zeros(4), 2)
    with step.gradient_sync(Wrapped(), first):
        pass
    with step.gradient_sync(Wrapped(), last):
        pass
    with step.gradient_sync(nn.Linear(1, 1), first):  # one process: nothing to hold back
        pass
    assert synced == ["held"]


@pytest.fixture
def no_dropout(monkeypatch):
    """train.py's GoogLeNet without dropout, whose masks depend on how a batch is cut into chunks."""
    real = train.GoogLeNet

    def without_dropout(*args, **kwargs):
        model = real(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    monkeypatch.setattr(train, "GoogLeNet", without_dropout)


def test_micro_batches_train_as_the_whole_batch(tree, tmp_path, monkeypatch, no_dropout):
    """Without BatchNorm (the paper variant), --micro-batch 2 accumulates the same gradients as
    whole batches of 4 (up to float rounding), so the run ends on the same weights. SGD keeps the
    comparison tight (Adam would magnify rounding in near-zero gradients), and it is --opt sgd's
    own check: the momentum and weight decay reach the optimizer."""
    chunk_sizes = []
    real = step.micro_batches

    def recording(images_, targets, labels, size, outliers=None, rotated=None):
        chunks = real(images_, targets, labels, size, outliers, rotated)
        chunk_sizes.append([len(c.images) for c in chunks])
        return chunks

    monkeypatch.setattr(step, "micro_batches", recording)
    runs = {}
    for micro in (0, 2):
        out = tmp_path / f"micro{micro}"
        argv = train_argv(tree, out, "--image-size", 32, "--variant", "paper", "--opt", "sgd", "--no-model-ema",
                          "--micro-batch", micro)
        code, _, err = call(train, argv)
        assert code == 0, err
        runs[micro] = load(out / "last.pth")
        with open(out / "metrics.csv", newline="") as f:
            runs[micro]["train_loss"] = float(next(csv.DictReader(f))["train_loss"])
    assert chunk_sizes == [[4]] * 3 + [[2, 2]] * 3
    whole, micro = runs[0], runs[2]
    assert micro["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    for key, value in whole["model"].items():
        torch.testing.assert_close(micro["model"][key], value, rtol=1e-4, atol=1e-7, msg=key)
    group = micro["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0.05)
    assert all("momentum_buffer" in s for s in micro["optimizer"]["state"].values())


# ---------------------------------------------------------------------------------------------
# MixUp and CutMix in the step
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_aux_heads_get_the_same_soft_targets(tree):
    """train_one_epoch with --mixup-alpha: the main and both aux losses see one soft target tensor,
    and no training accuracy is reported (the targets are mixtures, not classes)."""
    args = train.get_args_parser().parse_args(["--mixup-alpha", "0.4", "--batch-size", "4", "--epochs", "1"])
    seen = []

    def criterion(outputs, targets):
        seen.append(targets)
        return torch.nn.functional.cross_entropy(outputs, targets)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            z = self.fc(x.mean((2, 3)))
            return z, z * 2, z * 3

    ds = dataset_of(tree / "train", data.train_transform(32))
    loader = data.make_loader(ds, data.EpochSampler(len(ds), True), 4, 0, CPU)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = run_state.TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0),
                                    dev.grad_scaler(CPU, None), None)
    training = train.Training(model, state, criterion, data.build_batch_mix(0.4, 0.0, 3), None, stopping.StopRequest())
    record = ckpt.Record(["daisy", "roses", "tulips"], "paper", (32, 32), images.Preprocessing(32, 32), None, {})
    run = train.Run(args, 0, 1, dev.place("cpu", "off"), record)
    progress = run_state.Progress(plan=schedule.fixed_plan(1))
    result = train.train_one_epoch(training, data.Loaders(loader, loader, 0, 32), run, progress)
    assert result.accuracy is None and result.loss > 0 and not result.stopped
    assert progress.step == len(loader) and progress.seen == len(ds)
    assert len(seen) == 3 * len(loader)
    for main, aux1, aux2 in zip(seen[0::3], seen[1::3], seen[2::3]):
        assert main.shape == (4, 3) and main.dtype == torch.float32
        assert main is aux1 is aux2


# ---------------------------------------------------------------------------------------------
# the memory format
# ---------------------------------------------------------------------------------------------
def test_no_channels_last_keeps_the_model_and_its_batches_nchw(tmp_path, monkeypatch):
    models, batches = [], []
    real_model, real_normalize = train.GoogLeNet, data.normalize_batch

    def recording_model(*args, **kwargs):
        models.append(real_model(*args, **kwargs))
        return models[-1]

    def recording_normalize(batch, *args, channels_last=False):
        batches.append(real_normalize(batch, *args, channels_last=channels_last))
        return batches[-1]

    monkeypatch.setattr(train, "GoogLeNet", recording_model)
    monkeypatch.setattr(data, "normalize_batch", recording_normalize)
    tree = make_tree(tmp_path / "data", n_train=1, n_val=1)
    for flag, channels_last in (("--channels-last", True), ("--no-channels-last", False)):
        models.clear()
        batches.clear()
        code, _, err = call(train, train_argv(tree, tmp_path / flag, "--image-size", 32, flag))
        assert code == 0, err
        (model,) = models
        assert model.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert len(batches) >= 2  # training, val (and the passes after training)
        assert all(b.is_contiguous(memory_format=torch.channels_last) == channels_last for b in batches), flag


# ---------------------------------------------------------------------------------------------
# fp16's loss scaling, and divergence
# ---------------------------------------------------------------------------------------------
def test_fp16_loss_scaling_trains_like_the_plain_run(small_run, tmp_path, monkeypatch):
    """CUDA's fp16 path scales the loss, unscales the gradients inside the fused optimizer step and
    adapts the scale. Here that GradScaler runs on the CPU in fp32: scaling by a power of two is
    exact, so the epoch must end on the same weights as the plain run (small_run), bit for bit."""
    scalers = []

    def enabled_scaler(device, dtype):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(dev, "grad_scaler", enabled_scaler)
    argv = list(small_run["argv"])
    out = tmp_path / "scaled"
    argv[argv.index("--output-dir") + 1] = str(out)
    argv[argv.index("--class-indices") + 1] = str(out / "ci.json")
    code, _, err = call(train, argv)
    assert code == 0, err
    assert len(scalers) == 1 and scalers[0].is_enabled()
    assert scalers[0].get_scale() == 2.0 ** 15  # grown after each of the 3 steps: no inf was found
    last, plain = load(out / "last.pth"), load(small_run["last"])
    assert last["scaler"]["scale"] == 2.0 ** 15  # and saved for --resume
    assert last["model"].keys() == plain["model"].keys()
    assert all(torch.equal(last["model"][k], plain["model"][k]) for k in plain["model"])


@pytest.mark.parametrize("n_train,where", [(4, r"at epoch 1, step \d+"), (1, r"after epoch 1")],
                         ids=["in-a-step", "after-the-last-step"])
def test_nan_stops_and_keeps_best(small_run, tmp_path, n_train, where):
    """lr 1e12 blows the weights up after one Adam step: with 4 images per class the next step's
    loss is NaN; with one image per class (one step per epoch) the validation loss is."""
    data_dir = small_run["data"] if n_train == 4 else make_tree(tmp_path / "data", n_train=1, n_val=1)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(small_run["best"], out / "best.pth")
    before = (out / "best.pth").read_bytes()
    code, _, err = call(train, train_argv(data_dir, out, "--image-size", 32, "--lr", "1e12", "--overwrite", epochs=2))
    line = assert_clean_error(code, err, "diverged", "--lr")
    assert re.search(where, line), line
    assert (out / "best.pth").read_bytes() == before
    if n_train == 4:  # diverged in the first epoch: nothing was saved
        assert not (out / "last.pth").exists()
