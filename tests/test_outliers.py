"""Outlier exposure (--outliers): the generated outliers, their loss, how a step shares them among
micro-batches, the AUROC that judges them, and what training with them does to photos of none of
the classes."""
import math

import numpy as np
import pytest
import torch

import train
from helpers import COLORS, call, load, save_image, train_argv
from inference import calibration, classify
from inference import checkpoint as ckpt
from inference.images import Preprocessing
from plumbing import device as dev
from plumbing import stopping
from training import data, recipe, run_state, schedule, step
from training.data import MEAN, STD
from training.outliers import KINDS, OutlierMaker, blended, noise, shapes, shuffled, textures, uniform_loss


def photos(n=6, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.quick
@pytest.mark.parametrize("channels_last", [False, True])
def test_outliers_are_shaped_like_the_batch_and_drawn_again_the_same_for_the_same_step(channels_last):
    images = photos()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    maker = OutlierMaker(10, MEAN, STD, seed=3)
    a = maker.make(images, epoch=2, step=5)
    assert a.shape == (10, 3, 32, 32) and a.dtype == images.dtype and torch.isfinite(a).all()
    assert a.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(a, maker.make(images, epoch=2, step=5))  # a resumed run makes the same ones
    assert not torch.equal(a, maker.make(images, epoch=2, step=6))
    assert not torch.equal(a, maker.make(images, epoch=3, step=5))
    assert not torch.equal(a, OutlierMaker(10, MEAN, STD, seed=3, rank=1).make(images, epoch=2, step=5))
    assert len({tuple(o.flatten()[:8].tolist()) for o in a}) == 10  # no two alike


@pytest.mark.quick
@pytest.mark.parametrize("make", [noise, textures, shapes])
def test_drawn_outliers_lie_in_0_1_and_are_not_flat(make):
    g = torch.Generator().manual_seed(0)
    out = make(4, 3, (40, 40), g, "cpu")
    assert out.shape == (4, 3, 40, 40)
    assert out.min() >= 0 and out.max() <= 1
    assert all(o.std() > 0.01 for o in out)


@pytest.mark.quick
def test_a_shuffled_outlier_holds_one_photos_tiles_in_another_order():
    images = photos(3, size=32)
    out = shuffled(images, 4, torch.Generator().manual_seed(1))
    for o in out:
        # 8 x 8 tiles of 4 x 4 px: the same set of tiles as one photo of the batch, not in its order
        tiles = o.reshape(3, 8, 4, 8, 4).permute(1, 3, 0, 2, 4).reshape(64, -1)
        sources = [p.reshape(3, 8, 4, 8, 4).permute(1, 3, 0, 2, 4).reshape(64, -1) for p in images]
        source = next(s for s in sources if torch.equal(sorted_rows(s), sorted_rows(tiles)))
        assert not torch.equal(source, tiles)


def sorted_rows(t):
    return torch.stack(sorted(t, key=lambda row: row.tolist()))


@pytest.mark.quick
def test_a_blended_outlier_averages_three_different_photos_none_weighing_much_more_than_a_third():
    images = torch.zeros(6, 3, 2, 3)
    for i in range(6):
        images[i].view(-1)[i] = 1.0  # photo i is 1 at pixel i alone: the blend there is its weight
    out = blended(images, 50, torch.Generator().manual_seed(2))
    weights = out.view(50, -1)[:, :6]
    assert ((weights > 0).sum(dim=1) == 3).all()
    assert weights.sum(dim=1) == pytest.approx(torch.ones(50))
    chosen = weights[weights > 0]
    assert chosen.min() > 0.2 and chosen.max() < 0.47


def blends_of(images, outliers):
    """Which outliers are blends of the batch's photos: those that lie in the photos' span (a least-squares
    fit leaves nothing over), with each one's largest weight. A drawn or shuffled outlier lies far from it."""
    basis = images.flatten(1).T.double()
    found = []
    for o in outliers.flatten(1).double():
        weights = torch.linalg.lstsq(basis, o[:, None]).solution[:, 0]
        if (basis @ weights - o).norm() < 1e-4 * o.norm():
            found.append(weights.max().item())
    return found


@pytest.mark.quick
@pytest.mark.parametrize("batch", [1, 2])
def test_a_batch_of_fewer_than_three_photos_gets_no_blend_of_the_same_photo_again(batch):
    """A last batch of one photo once got that photo back as a "blended" outlier (three copies of it
    averaged), which taught the model to answer a flower with uniform probabilities; with two photos one
    of them weighed two thirds. Such batches get the other kinds instead, as many outliers in all."""
    maker = OutlierMaker(len(KINDS) * 4, MEAN, STD, seed=5)
    images = photos(batch)
    for step_ in range(3):
        out = maker.make(images, epoch=0, step=step_)
        assert len(out) == len(KINDS) * 4 and torch.isfinite(out).all()
        assert blends_of(images, out) == []
        assert torch.equal(out, maker.make(images, epoch=0, step=step_))  # still drawn again the same


@pytest.mark.quick
def test_a_batch_of_three_photos_gets_its_share_of_blends_of_all_three():
    images = photos(3)
    blends = blends_of(images, OutlierMaker(len(KINDS) * 4, MEAN, STD, seed=5).make(images, epoch=0, step=0))
    assert len(blends) == 4 and max(blends) < 0.47


@pytest.mark.quick
def test_every_kind_is_made_in_equal_shares():
    maker = OutlierMaker(len(KINDS) * 3, MEAN, STD, seed=0)
    images = photos(4)
    out = maker.make(images, 0, 0)
    # the photo-made kinds stay inside the batch's range; the drawn ones are normalised [0, 1] images
    low = (torch.zeros(1, 3, 1, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    drawn = [bool(((o - low[0]) >= -1e-5).all()) for o in out]
    assert sum(drawn) >= 9  # noise, textures and shapes: 3 each (a photo-made one may land above too)


@pytest.mark.quick
def test_the_outlier_loss_is_smallest_at_uniform_answers():
    assert uniform_loss(torch.zeros(4, 5)).item() == pytest.approx(math.log(5))
    assert uniform_loss(torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0]])).item() > math.log(5)
    logits = torch.tensor([[2.0, -1.0, 0.5]], requires_grad=True)
    uniform_loss(logits).backward()
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0  # it pulls the logits together


@pytest.mark.quick
@pytest.mark.parametrize("micro_batch, expected", [(0, [8]), (4, [2, 2, 2, 2]), (5, [3, 2, 3, 0]), (16, [8])])
def test_a_steps_outliers_are_shared_among_its_micro_batches_in_proportion(micro_batch, expected):
    images, labels = photos(16), torch.arange(16) % 2
    outliers = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 32, 32)
    chunks = step.micro_batches(images, labels, labels, micro_batch, outliers)
    assert [0 if c.outliers is None else len(c.outliers) for c in chunks] == expected
    assert torch.equal(torch.cat([c.outliers for c in chunks if c.outliers is not None]), outliers)  # once, in order
    assert [c.outlier_share for c in chunks] == [n / 8 for n in expected]  # their loss x share: the step's mean
    assert all(len(c.inputs) == len(c.images) + (0 if c.outliers is None else len(c.outliers)) for c in chunks)
    assert step.micro_batches(images, labels, labels, micro_batch)[0].outliers is None


class Heads(torch.nn.Module):
    """GoogLeNet's three outputs (logits, aux2, aux1) from linear heads: no BatchNorm and no dropout,
    so every image's answer is the same whichever chunk it is in."""

    def __init__(self, classes=3, pixels=3 * 16 * 16):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(pixels, classes) for _ in range(3))

    def forward(self, x):
        x = x.flatten(1)
        return tuple(head(x) for head in self.heads)


def one_step_gradients(outliers, micro_batch, batch=8):
    """The gradients and the loss of train.py's one step on one batch (train_one_epoch) with these options."""
    args = train.get_args_parser().parse_args(["--batch-size", str(batch), "--outliers", str(outliers),
                                               "--micro-batch", str(micro_batch), "--outlier-weight", "1"])
    torch.manual_seed(0)
    model = Heads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    gradients = []  # as the step sees them (train_one_epoch sets them to None after it)
    optimizer.register_step_pre_hook(lambda *_: gradients.extend(p.grad.clone() for p in model.parameters()))
    state = run_state.TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0),
                                    dev.grad_scaler(torch.device("cpu"), None), None)
    maker = OutlierMaker(outliers, MEAN, STD, seed=0)
    training = train.Training(model, state, recipe.ClassWeightedLoss(), None, maker, stopping.StopRequest())
    record = ckpt.Record(["a", "b", "c"], "paper", (16, 16), Preprocessing(16, 16), None, {})
    run = train.Run(args, 0, 1, dev.place("cpu", "off"), record)
    generator = torch.Generator().manual_seed(1)
    batch_ = (torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=generator),
              torch.arange(batch) % 3, torch.ones(batch, dtype=torch.bool))
    progress = run_state.Progress(plan=schedule.fixed_plan(1))
    train.train_one_epoch(training, data.Loaders([batch_], None, 0, 16), run, progress)
    assert progress.step == 1 and len(gradients) == len(list(model.parameters()))
    return gradients, progress.loss_sum / progress.seen


@pytest.mark.quick
@pytest.mark.parametrize("outliers, micro_batch", [(1, 2), (3, 3), (5, 2), (8, 1)])
def test_a_steps_loss_and_gradients_do_not_depend_on_its_micro_batches(outliers, micro_batch):
    """--outliers 1 --micro-batch 8 once weighed the outliers' loss a quarter of the whole batch's: each
    chunk's outlier loss was scaled by its share of the photos, not of the outliers."""
    whole, whole_loss = one_step_gradients(outliers, 0)
    split, split_loss = one_step_gradients(outliers, micro_batch)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, split):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.quick
def test_auroc_is_the_share_of_known_unknown_pairs_ranked_right():
    rng = np.random.default_rng(0)
    known, unknown = rng.integers(0, 6, 40) / 5, rng.integers(0, 6, 30) / 5  # many ties
    pairs = (known[:, None] > unknown[None, :]).mean() + 0.5 * (known[:, None] == unknown[None, :]).mean()
    assert calibration.auroc(known, unknown) == pytest.approx(pairs)
    assert calibration.auroc([0.9, 0.8], [0.1]) == 1.0 and calibration.auroc([0.1], [0.9, 0.8]) == 0.0
    assert math.isnan(calibration.auroc([], [0.5]))


# ---------------------------------------------------------------------------------------------
# training with them
# ---------------------------------------------------------------------------------------------
def noise_photos(folder, n=12):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"noise_{i}.png")
    return sorted(str(p) for p in folder.iterdir())


DECISIVE = ["--image-size", 32, "--val-ratio", 0.25, "--epochs", 6, "--no-model-ema", "--warmup-epochs", 0,
            "--label-smoothing", 0, "--lr", 3e-3, "--auto-augment", "none"]


def top_probabilities(photos_dir, out, files):
    """The top probabilities predict.py gives files, and whether it classifies the val photos right."""
    best = load(out / "best.pth")
    val = [str(photos_dir / f) for f in best["split"]["val_files"]]
    classifier = classify.load_classifier(str(out / "best.pth"), device="cpu", amp="off")
    probabilities, errors = classify.predict(classifier, files + val, 8, 0)
    assert not any(errors)
    right = probabilities[len(files):].argmax(axis=1) == [0 if "/daisy/" in f else 1 for f in val]
    top = probabilities.max(axis=1)
    return top[:len(files)], top[len(files):], right.all()


def test_training_with_outliers_gives_photos_of_no_class_nearly_uniform_answers(tmp_path):
    """Two colour classes, trained with and without outliers: with them, noise photos (made here,
    not by the training's generator) get a top probability near 1/2 and below every val photo's,
    which are still classified right; without them, the same model is sure of the noise."""
    photos_dir = tmp_path / "photos"
    for k, name in enumerate(("daisy", "roses")):
        for i in range(16):
            save_image(photos_dir / name / f"{name}_{i:02d}.jpg", COLORS[k], seed=k * 1000 + i, size=(48, 48))
    noisy = noise_photos(tmp_path / "noise")
    tops = {}
    for outliers in (0, 8):
        out = tmp_path / f"out{outliers}"
        code, _, err = call(train, train_argv(photos_dir, out, *DECISIVE, "--outliers", outliers, epochs=None,
                                              batch_size=8))
        assert code == 0, err
        assert load(out / "best.pth")["args"]["outliers"] == outliers
        tops[outliers] = top_probabilities(photos_dir, out, noisy)
    noise_top, val_top, all_right = tops[8]
    assert all_right
    assert noise_top.max() < 0.65  # two classes: 0.5 is uniform
    assert calibration.auroc(val_top, noise_top) == 1.0
    assert tops[0][0].mean() > noise_top.mean() + 0.15  # measured: about 0.85 against 0.57


def test_outliers_are_off_by_default_and_recorded(small_run):
    assert load(small_run["best"])["args"]["outliers"] == 0

