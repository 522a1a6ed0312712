"""The recipe tools: bf16 on CPUs, augmentation policies, MixUp/CutMix, EMA, image sizes, TTA, variants.

Offline and CPU only. bf16 runs here even on CPUs without native bf16 (many times slower there), so
its tests use 48-64 px images and batches of 4.
"""
import copy
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from helpers import FP32, call, dataset_of, load, make_tree, stop_after_step, train_argv
from inference import checkpoint as ckpt
from inference import classify, images
from model import GoogLeNet, logits_with_mirror
from plumbing import device as dev
from training import data, recipe, run_state, schedule, step

CPU = torch.device("cpu")


def relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("recipes") / "data", n_train=4, n_val=2)


# ---------------------------------------------------------------------------------------------
# bf16 on CPUs: the decision, and what it computes
# ---------------------------------------------------------------------------------------------
def test_bf16_flags_are_read_from_the_cpu_capabilities(monkeypatch):
    monkeypatch.delenv(dev.BF16_OVERRIDE, raising=False)  # this test is about what the CPU itself reports
    assert dev.cpu_bf16_flags({"avx512_bf16": True, "amx_bf16": False, "avx2": True}) == ["avx512_bf16"]
    assert dev.cpu_bf16_flags({"avx512_bf16": True, "amx_bf16": True}) == ["avx512_bf16", "amx_bf16"]
    assert dev.cpu_bf16_flags({"avx2": True, "avx512_f": True}) == []
    reported = torch.cpu.get_capabilities()  # this machine's own answer has the keys we read
    assert all(flag in reported for flag in dev.BF16_CPU_FLAGS)
    assert dev.cpu_bf16_flags() == [f for f in dev.BF16_CPU_FLAGS if reported[f]]


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_environment_can_force_what_auto_decides(forced, monkeypatch):
    """GOOGLENET_CPU_BF16 lets one machine run the suite as either kind of CPU would."""
    monkeypatch.setenv(dev.BF16_OVERRIDE, forced)
    assert dev.amp_dtype(CPU, "auto") is (torch.bfloat16 if forced == "1" else None)
    words, warning = dev.describe_precision(CPU, dev.amp_dtype(CPU, "auto"))
    assert warning is None
    assert words == ("bf16 autocast (CPU has native bf16: GOOGLENET_CPU_BF16=1)" if forced == "1"
                     else "fp32 (CPU has no native bf16)")
    # injected flags still decide: the tests of the decision do not depend on the environment
    assert dev.amp_dtype(CPU, "auto", cpu_flags=[]) is None
    assert dev.amp_dtype(CPU, "auto", cpu_flags=["avx512_bf16"]) is torch.bfloat16
    monkeypatch.setenv(dev.BF16_OVERRIDE, "yes")
    with pytest.raises(dev.DeviceError, match="GOOGLENET_CPU_BF16=yes: expected 1"):
        dev.amp_dtype(CPU, "auto")


@pytest.mark.parametrize("flags", [[], ["avx512_bf16"], ["avx512_bf16", "amx_bf16"]])
def test_cpu_precision_follows_native_bf16(flags):
    native = bool(flags)
    assert dev.amp_dtype(CPU, "auto", cpu_flags=flags) is (torch.bfloat16 if native else None)
    assert dev.amp_dtype(CPU, "off", cpu_flags=flags) is None
    assert dev.amp_dtype(CPU, "bf16", cpu_flags=flags) is torch.bfloat16  # forced: obeyed either way
    with pytest.raises(dev.DeviceError, match="fp16"):
        dev.amp_dtype(CPU, "fp16", cpu_flags=flags)
    words, warning = dev.describe_precision(CPU, dev.amp_dtype(CPU, "auto", cpu_flags=flags), cpu_flags=flags)
    assert words.startswith("bf16 autocast" if native else "fp32") and (flags[0] in words if native else True)
    assert warning is None
    words, warning = dev.describe_precision(CPU, torch.bfloat16, cpu_flags=flags)
    assert (warning is None) == native  # forced bf16 without native support is warned about
    if not native:
        assert "slower" in warning and "--amp auto" in warning


def test_start_up_line_names_the_precision(tree, tmp_path):
    code, out, err = call(train, train_argv(tree, tmp_path / "bf16", "--image-size", 48, amp="bf16"))
    assert code == 0, err
    native = bool(dev.cpu_bf16_flags())
    assert "device cpu, bf16 autocast" in out
    assert ("warning: --amp bf16 on a CPU without native bf16" in out) != native
    code, out, err = call(train, train_argv(tree, tmp_path / "off", "--image-size", 48, amp="off"))
    assert code == 0, err
    assert "device cpu, fp32" in out
    # left to auto, the run takes what this CPU (or GOOGLENET_CPU_BF16) decides, and says so
    code, out, err = call(train, train_argv(tree, tmp_path / "auto", "--image-size", 48, amp=None))
    assert code == 0, err
    assert f"device cpu, {dev.describe_precision(CPU, dev.amp_dtype(CPU, 'auto'))[0]};" in out


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_bf16_forward_and_training_steps_stay_close_to_fp32(variant):
    """Tolerances: bf16 keeps 8 significant bits (a rounding error of at most 2^-9 = 0.2% per value).
    In eval the logits come out of ~60 rounded layers and differ by about 0.7% (measured): 3% is
    allowed. Training is compared by what it does, the loss over three AdamW steps from the same
    start: the per-element gradients themselves may differ a lot where BatchNorm subtracts nearly
    equal bf16-rounded values over a tiny batch, which changes the steps' direction little (losses
    measured within 1-4%); 10% is allowed. Both runs must really differ in precision."""
    torch.manual_seed(0)
    start = GoogLeNet(num_classes=3, init_weights=True, variant=variant).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 48, 48).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 1])
    start.eval()
    with torch.inference_mode():
        reference = start(x)
        with dev.autocast(CPU, torch.bfloat16):
            low = start(x)
    assert low.dtype == torch.bfloat16 and reference.dtype == torch.float32
    assert relative_error(low, reference) < 3e-2

    losses = {}
    for dtype in (None, torch.bfloat16):
        model = copy.deepcopy(start).train()
        for dropout in (model.dropout, model.aux1.dropout, model.aux2.dropout):
            dropout.p = 0.0  # the same function in both precisions
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses[dtype] = []
        for _ in range(3):
            optimizer.zero_grad()
            with dev.autocast(CPU, dtype):
                outputs = model(x)
            assert outputs[0].dtype == (dtype or torch.float32)
            loss = sum(w * torch.nn.functional.cross_entropy(o.float(), y) for w, o in zip((1, 0.3, 0.3), outputs))
            loss.backward()
            optimizer.step()
            losses[dtype].append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    for fp32, bf16 in zip(losses[None], losses[torch.bfloat16]):
        assert abs(bf16 - fp32) / fp32 < 0.1, losses


def test_bf16_micro_batches_and_channels_last_keep_the_loss():
    """The fast paths hold in bf16 too: NHWC and micro-batches compute the same training loss
    (within bf16 rounding: 2%) as the plain NCHW full batch."""
    torch.manual_seed(0)
    plain = GoogLeNet(num_classes=3, init_weights=True).train()
    for dropout in (plain.dropout, plain.aux1.dropout, plain.aux2.dropout):
        dropout.p = 0.0
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 1])

    def loss_of(model, inputs, chunk):
        total = 0.0
        for xs, ys in zip(inputs.split(chunk), y.split(chunk)):
            with dev.autocast(CPU, torch.bfloat16):
                outputs = model(xs)
            loss = sum(w * torch.nn.functional.cross_entropy(o.float(), ys) for w, o in zip((1, .3, .3), outputs))
            total += loss.item() * len(xs) / len(inputs)
        return total

    reference = loss_of(plain, x, 4)
    assert loss_of(fast, x.contiguous(memory_format=torch.channels_last), 4) == pytest.approx(reference, rel=2e-2)
    assert loss_of(plain, x, 2) == pytest.approx(reference, rel=2e-2)


# ---------------------------------------------------------------------------------------------
# per-image transforms: policies, erasing, evaluation sizes
# ---------------------------------------------------------------------------------------------
def photo(seed=0, size=(160, 120)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("policy", sorted(data.AUTO_AUGMENT))
def test_augmentation_policies_are_torchvisions_and_seeded_per_image(policy, tmp_path):
    transform = data.train_transform(64, auto_augment=policy)
    assert any(type(t) is data.AUTO_AUGMENT[policy] for t in transform.transforms)
    for i in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        photo(i).save(tmp_path / "a" / f"{i}.png")
    ds = dataset_of(tmp_path, transform)
    first = ds[(0, 11)][0]
    assert first.shape == (3, 64, 64) and first.dtype == torch.uint8
    torch.manual_seed(123)  # the global generator neither matters nor is consumed
    assert torch.equal(ds[(0, 11)][0], first)
    assert not all(torch.equal(ds[(0, s)][0], first) for s in range(12, 16))


def test_random_erase_paints_a_grey_rectangle():
    image = Image.fromarray(np.zeros((100, 100, 3), np.uint8))  # black: the erased part stands out
    torch.manual_seed(0)
    erased = data.train_transform(64, random_erase=1.0)(image)
    grey = (erased == data.ERASE_VALUE).all(dim=0)
    assert grey.any() and not grey.all()
    rows, cols = grey.any(dim=1).nonzero(), grey.any(dim=0).nonzero()
    box = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one filled rectangle
    assert (data.train_transform(64, random_erase=0.0)(image) == 0).all()


def test_evaluation_resize_then_centre_crop():
    image = Image.fromarray(np.arange(120 * 160 * 3, dtype=np.uint32).reshape(120, 160, 3).astype(np.uint8))
    out = data.EvalTransform(images.Preprocessing(80, 64))(image)
    resized = np.asarray(image.resize((80, 80), Image.BILINEAR))
    assert out.shape == (3, 64, 64)
    assert torch.equal(out, torch.from_numpy(resized[8:72, 8:72].copy()).permute(2, 0, 1))
    assert data.EvalTransform(images.Preprocessing(96, 96))(image).shape == (3, 96, 96)


# ---------------------------------------------------------------------------------------------
# MixUp and CutMix
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_batch_mix_gives_soft_targets(mixup, cutmix):
    mix = data.build_batch_mix(mixup, cutmix, num_classes=5)
    images = torch.randn(6, 3, 16, 16).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(0)
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape and targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert (targets.max(1).values < 1).any()  # really mixed
    assert data.build_batch_mix(0.0, 0.0, 5) is None


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
    training = train.Training(model, state, criterion, data.build_batch_mix(0.4, 0.0, 3), step.StopRequest())
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


def test_mixup_run_reports_no_training_accuracy(tree, tmp_path):
    out = tmp_path / "mix"
    code, stdout, err = call(train, train_argv(tree, out, "--mixup-alpha", 0.2, "--cutmix-alpha", 1.0,
                                              "--image-size", 48))
    assert code == 0, err
    assert "[epoch 1] train_loss" in stdout and "train_accuracy" not in stdout
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[3] == "train_accuracy" and rows[1].split(",")[3] == ""


# ---------------------------------------------------------------------------------------------
# EMA, and exact resume with every recipe tool on
# ---------------------------------------------------------------------------------------------
RECIPE = ["--image-size", 48, "--val-crop", 64, "--auto-augment", "trivialaugment", "--random-erase", 0.5,
          "--mixup-alpha", 0.2, "--cutmix-alpha", 1.0, "--model-ema", "--model-ema-decay", 0.9,
          "--label-smoothing", 0.1, "--variant", "torchvision"]


@pytest.fixture(scope="module")
def recipe_epoch(tree, tmp_path_factory):
    """One uninterrupted epoch with every recipe tool on (3 steps of 4 images)."""
    out = tmp_path_factory.mktemp("recipe") / "A"
    assert call(train, train_argv(tree, out, *RECIPE))[0] == 0
    return out


def test_ema_weights_are_validated_and_saved_as_best(recipe_epoch):
    best, last = load(recipe_epoch / "best.pth"), load(recipe_epoch / "last.pth")
    ema = {k[len("module."):]: v for k, v in last["model_ema"].items() if k.startswith("module.")}
    assert last["model_ema"]["n_averaged"].item() == 3  # updated once per step
    assert ema.keys() == best["model"].keys()
    for key in best["model"]:
        assert torch.equal(best["model"][key], ema[key]), key
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert best["variant"] == "torchvision"
    assert (best["image_size"], best["val_resize"], best["val_crop"]) == (48, 64, 64)


def test_ema_is_pytorchs_averaged_model_with_a_growing_decay():
    args = train.get_args_parser().parse_args(["--model-ema", "--model-ema-decay", "0.5"])
    model = torch.nn.Linear(2, 1)
    ema = recipe.build_ema(args, model)
    assert isinstance(ema, torch.optim.swa_utils.AveragedModel)
    expected = model.weight.detach().clone()
    ema.update_parameters(model)  # the first update copies
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        decay = min(0.5, (1 + n) / (10 + n))  # 1/10, 2/11, ... until it reaches --model-ema-decay
        expected = decay * expected + (1 - decay) * model.weight.detach()
        torch.testing.assert_close(ema.module.weight, expected)
    assert recipe.build_ema(train.get_args_parser().parse_args(["--no-model-ema"]), model) is None


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_resume_mid_epoch_with_every_recipe_tool_is_bit_for_bit(tree, recipe_epoch, tmp_path, monkeypatch, amp):
    """Stopped after step 2 and resumed from the save after step 1, the run must end on the
    uninterrupted run's weights, EMA and best.pth exactly (augmentation, erasing, MixUp/CutMix
    draws and the EMA all included), in fp32 and in bf16."""
    reference = recipe_epoch
    if amp == "bf16":
        reference = tmp_path / "A"
        assert call(train, train_argv(tree, reference, *RECIPE, amp="bf16"))[0] == 0
    out, saved = tmp_path / "C", tmp_path / "after_step_1.pth"
    argv = train_argv(tree, out, *RECIPE, amp=amp)
    with monkeypatch.context() as m:
        m.setattr(train.StopRequest, "check", stop_after_step(2, out, saved))
        code, stdout, err = call(train, argv + ["--save-every", "1"])
    assert code == 128 + signal.SIGTERM, err
    assert "stopped at epoch 1, step 2" in stdout
    assert not (out / "best.pth").exists()
    stopped, mid = load(out / "last.pth"), load(saved)
    assert (stopped["epoch"], stopped["step"]) == (0, 2)  # in epoch 1 (none completed), after step 2
    assert (mid["epoch"], mid["step"]) == (0, 1)
    code, stdout, err = call(train, argv + ["--resume", saved])
    assert code == 0, err
    assert "epoch 1, step 1" in stdout
    assert (load(out / "last.pth")["epoch"], load(out / "last.pth")["step"]) == (1, 0)
    a, c = load(reference / "last.pth"), load(out / "last.pth")
    for key in ("model", "model_ema"):
        assert a[key].keys() == c[key].keys()
        assert all(torch.equal(a[key][k], c[key][k]) for k in a[key]), key
    best_a, best_c = load(reference / "best.pth"), load(out / "best.pth")
    assert all(torch.equal(best_a["model"][k], best_c["model"][k]) for k in best_a["model"])


def test_resume_of_a_run_without_ema_asks_to_leave_it_out(tree, tmp_path):
    out = tmp_path / "plain"
    assert call(train, train_argv(tree, out, "--image-size", 48, "--no-model-ema"))[0] == 0
    code, _, err = call(train, train_argv(tree, out, "--image-size", 48, "--model-ema", "--resume",
                                          out / "last.pth", epochs=2))
    assert code == 2 and "without --model-ema" in err


# ---------------------------------------------------------------------------------------------
# image sizes, the aux heads at every size, variants, TTA
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["paper", "torchvision"])
@pytest.mark.parametrize("size", [96, 160, 192, 224, 256])
def test_aux_heads_work_at_every_image_size(variant, size):
    model = GoogLeNet(num_classes=5, variant=variant).train()
    logits, aux2, aux1 = model(torch.randn(2, 3, size, size))
    assert logits.shape == aux2.shape == aux1.shape == (2, 5)
    logits.sum().add(aux1.sum()).add(aux2.sum()).backward()
    assert model.aux1.fc1.weight.grad.abs().sum() > 0


def test_paper_aux_head_at_224_is_exactly_the_5x5_stride_3_pool():
    torch.manual_seed(0)
    head = GoogLeNet(num_classes=5).aux1.eval()
    features = torch.randn(2, 512, 14, 14)
    x = torch.nn.functional.avg_pool2d(features, kernel_size=5, stride=3)
    expected = head.fc2(head.relu(head.fc1(torch.flatten(head.conv(x), 1))))
    assert torch.equal(head(features), expected)
    other = torch.randn(2, 512, 10, 10)  # 160 px: adaptive windows give the same 4 x 4 grid
    x = torch.nn.functional.adaptive_avg_pool2d(other, 4)
    assert torch.equal(head(other), head.fc2(head.relu(head.fc1(torch.flatten(head.conv(x), 1)))))


def test_other_sizes_train_and_predict_at_the_recorded_sizes(tree, tmp_path):
    out = tmp_path / "small"
    code, stdout, err = call(train, train_argv(tree, out, "--image-size", 96, "--val-resize", 144,
                                               "--val-crop", 128))
    assert code == 0, err
    assert "96 px training crops, evaluation at 128 px" in stdout
    best = load(out / "best.pth")
    assert (best["image_size"], best["val_resize"], best["val_crop"]) == (96, 144, 128)
    model, classes, preprocessing = ckpt.load_model(str(out / "best.pth"), "unused.json", CPU)
    assert preprocessing == images.Preprocessing(144, 128, images.MEAN, images.STD)
    image = tree / "val" / "roses" / "roses_00.jpg"
    classifier = classify.load_classifier(str(out / "best.pth"), device="cpu", amp="off")
    got, errors = classify.predict(classifier, [str(image)], 1, 0)
    assert errors == [""]
    x = data.EvalTransform(preprocessing)(images.load_image(str(image)))
    with torch.inference_mode():
        expected = torch.softmax(model(data.normalize_batch(x[None], channels_last=True)), 1)
    torch.testing.assert_close(torch.from_numpy(got), expected)
    # --eval-only takes the sizes the weights record unless told otherwise
    code, stdout, err = call(train, [*FP32, "--eval-only", "--weights", out / "best.pth", "--data-path", tree,
                                     "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert code == 0, err
    assert "evaluation at 128 px" in stdout
    code, stdout, err = call(train, [*FP32, "--eval-only", "--weights", out / "best.pth", "--data-path", tree,
                                     "--output-dir", tmp_path / "ev", "--device", "cpu", "--val-crop", 96])
    assert code == 0, err
    assert "evaluation at 96 px" in stdout


def test_torchvision_variant_trains_from_scratch_and_predicts(tree, tmp_path):
    out = tmp_path / "tv"
    code, _, err = call(train, train_argv(tree, out, "--variant", "torchvision", "--image-size", 64))
    assert code == 0, err
    best = load(out / "best.pth")
    assert best["variant"] == "torchvision" and any(".bn." in k for k in best["model"])
    code, stdout, err = call(predict, [*FP32, tree / "val" / "daisy" / "daisy_00.jpg", "--weights", out / "best.pth"])
    assert code == 0, err
    assert len([line for line in stdout.splitlines() if line.split()[0] in ("daisy", "roses", "tulips")]) == 3
    code, _, err = call(train, train_argv(tree, tmp_path / "x", "--variant", "paper", "--weights", out / "best.pth"))
    assert code == 2 and "--variant paper" in err and "torchvision variant" in err


def test_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, aux_logits=False, init_weights=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        both = logits_with_mirror(model, x)
        torch.testing.assert_close(both, (model(x) + model(x.flip(3))) / 2)
        symmetric = (x + x.flip(3)) / 2  # its mirror is itself: TTA changes nothing
        torch.testing.assert_close(logits_with_mirror(model, symmetric), model(symmetric), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(both, model(x), atol=1e-6)


def test_tta_in_eval_only_and_predict(tree, tmp_path):
    out = tmp_path / "run"
    assert call(train, train_argv(tree, out, "--image-size", 64))[0] == 0
    code, stdout, err = call(train, [*FP32, "--eval-only", "--tta", "--weights", out / "best.pth", "--data-path", tree,
                                     "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert code == 0, err
    assert "accuracy:" in stdout
    image = tree / "val" / "tulips" / "tulips_01.jpg"
    model, _, preprocessing = ckpt.load_model(str(out / "best.pth"), "unused.json", CPU)
    classifier = classify.load_classifier(str(out / "best.pth"), device="cpu", amp="off")
    with_tta, _ = classify.predict(classifier, [str(image)], 1, 0, tta=True)
    assert (preprocessing.resize, preprocessing.crop) == (80, 80)  # evaluation at 1.25 x the 64 px training crops
    x = data.normalize_batch(data.EvalTransform(preprocessing)(images.load_image(str(image)))[None], channels_last=True)
    with torch.inference_mode():
        expected = torch.softmax((model(x) + model(x.flip(3))) / 2, 1)
    torch.testing.assert_close(torch.from_numpy(with_tta), expected)
    code, stdout, err = call(predict, [*FP32, image, "--weights", out / "best.pth", "--tta"])
    assert code == 0, err
    printed = {line.split()[0]: float(line.split()[1]) for line in stdout.splitlines() if len(line.split()) == 2}
    classes = ckpt.load_checkpoint(str(out / "best.pth"))["classes"]
    for k, name in enumerate(classes):
        assert printed[name] == pytest.approx(expected[0, k].item(), abs=1e-4)
