"""Training the "not sure" answer (issue 35): LogitNorm (--logit-norm), PixMix with generated pictures
(--pixmix), the rotation head (--rotation-weight), energy margins for the outliers (--outlier-loss
energy), and the "not sure" score a checkpoint records (--not-sure-score), which predict.py, the
page, --sort-into and the .onnx export use alike."""
import math
import shutil
import signal

import numpy as np
import pytest
import torch

import predict
import train
from helpers import (
    COLORS,
    assert_clean_error,
    call,
    load,
    make_tree,
    needs,
    save_image,
    stop_after_step,
    texture,
    train_argv,
)
from inference import calibration, classify
from inference import checkpoint as ckpt
from inference.calibration import Calibration
from model import GoogLeNet
from plumbing import stopping
from plumbing.options import UserError
from training import recipe, rotation, step
from training.data import MEAN, STD
from training.outliers import energy, energy_margin_loss, outlier_loss
from training.pixmix import PixMixer, fractals
from training.rotation import Rotator, rotation_loss


def photos(n=8, size=32, seed=0):
    """Normalised photo-like images (smooth blobs: no quarter turn of one equals another's)."""
    pictures = [torch.from_numpy(np.array(texture(seed * 100 + i, (size, size)))).permute(2, 0, 1) for i in range(n)]
    batch = torch.stack(pictures).float() / 255
    return (batch - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# LogitNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_logit_norm_computes_the_loss_on_logits_of_norm_one_over_tau():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 7
    targets = torch.arange(6) % 5
    tau = 0.25
    normalized = recipe.normalized_logits(logits, tau)
    assert normalized.norm(dim=1) == pytest.approx(torch.full((6,), 1 / tau), rel=1e-5)
    loss = recipe.ClassWeightedLoss(label_smoothing=0.1, logit_norm=tau)
    expected = torch.nn.functional.cross_entropy(normalized, targets, label_smoothing=0.1)
    assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # growing the logits changes nothing: the loss cannot be lowered by making the model surer
    assert loss(logits * 10, targets).item() == pytest.approx(loss(logits, targets).item(), rel=1e-5)
    plain = recipe.ClassWeightedLoss(label_smoothing=0.1)
    assert plain(logits * 10, targets).item() != pytest.approx(plain(logits, targets).item(), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# The rotation head's task
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_each_turned_copy_is_its_photo_turned_by_its_label_and_by_no_other_turn():
    images = photos(8).contiguous(memory_format=torch.channels_last)
    rotated = Rotator(0.5, seed=1).make(images, epoch=2, step=3)
    assert len(rotated.turns) == 4 and len(set(rotated.picks.tolist())) == 4  # 4 different photos of 8
    assert set(rotated.turns.tolist()) <= {1, 2, 3}
    assert rotated.images.is_contiguous(memory_format=torch.channels_last)
    for copy, turn, pick in zip(rotated.images, rotated.turns.tolist(), rotated.picks.tolist()):
        matches = [k for k in range(4) if torch.equal(torch.rot90(images[pick], k, dims=(1, 2)), copy)]
        assert matches == [turn]
    again = Rotator(0.5, seed=1).make(images, epoch=2, step=3)
    assert torch.equal(again.images, rotated.images) and torch.equal(again.turns, rotated.turns)
    other = Rotator(0.5, seed=1).make(images, epoch=2, step=4)
    assert not (torch.equal(other.picks, rotated.picks) and torch.equal(other.turns, rotated.turns))


@pytest.mark.quick
def test_the_rotation_loss_weighs_the_upright_photos_as_one_turn_of_four():
    photos_logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 0]])  # turn 0: sure and right, then uniform
    turned_logits = torch.tensor([[0, 0, 0, 0.0]])
    logits = torch.cat([photos_logits, torch.zeros(3, 4), turned_logits])  # 3 rows of outliers between
    upright = torch.nn.functional.cross_entropy(photos_logits, torch.zeros(2, dtype=torch.long))
    got = rotation_loss(logits, 2, torch.tensor([2]))
    assert got.item() == pytest.approx((upright.item() + 3 * math.log(4)) / 4)
    assert rotation_loss(logits[:2], 2).item() == pytest.approx(upright.item() / 4)  # a chunk without copies


@pytest.mark.quick
def test_turned_copies_are_shared_among_micro_batches_and_run_last():
    images, labels = photos(8), torch.arange(8) % 2
    outliers = torch.full((4, 3, 32, 32), 7.0)
    rotated = Rotator(0.5, seed=0).make(images, 0, 0)
    chunks = step.micro_batches(images, labels, labels, 3, outliers, rotated)
    assert torch.equal(torch.cat([c.turns for c in chunks if c.turns is not None]), rotated.turns)
    for chunk in chunks:
        extra = 0 if chunk.turns is None else len(chunk.turns)
        out = tuple(torch.arange(len(chunk.inputs)).view(-1, 1).float() for _ in range(4))
        heads, turn_logits = rotation.split_outputs(out, extra)
        assert len(heads[0]) == len(chunk.inputs) - extra and len(turn_logits) == len(chunk.inputs)
        if chunk.rotated is not None:
            assert torch.equal(chunk.inputs[len(chunk.inputs) - extra:], chunk.rotated)


@pytest.mark.quick
def test_the_model_has_a_rotation_head_only_when_asked_and_eval_gives_the_logits_alone():
    assert GoogLeNet(3).rotation is None
    assert not any(k.startswith("rotation.") for k in GoogLeNet(3).state_dict())  # the classic layout
    model = GoogLeNet(3, rotation_head=True, variant="torchvision")
    x = torch.randn(2, 3, 64, 64)
    logits, aux2, aux1, turns = model.train()(x)
    assert turns.shape == (2, 4) and logits.shape == aux1.shape == (2, 3)
    model.eval()
    assert model(x).shape == (2, 3)
    with torch.no_grad():
        agreement = model.rotation_agreement(x)
        # each turn on its own: the head's log-probability of that turn, averaged over the four
        right = [torch.log_softmax(model.rotation(model.features(torch.rot90(x, k, dims=(2, 3)))[0]), dim=1)[:, k]
                 for k in range(4)]
    assert agreement.shape == (2,) and (agreement <= 0).all()
    assert agreement == pytest.approx(torch.stack(right).mean(dim=0), abs=1e-5)


@pytest.mark.quick
def test_a_rotation_head_is_dropped_or_started_afresh_when_fine_tuning_and_required_otherwise():
    with_head, classic = GoogLeNet(3, rotation_head=True), GoogLeNet(3)
    fresh = GoogLeNet(3, rotation_head=True)
    assert ckpt.load_weights(fresh, classic.state_dict(), "classic.pth", reinit_heads=True) == ["rotation"]
    with pytest.raises(UserError, match="missing keys: rotation.bias, rotation.weight"):
        ckpt.load_weights(GoogLeNet(3, rotation_head=True), classic.state_dict(), "classic.pth")
    assert ckpt.load_weights(GoogLeNet(3), with_head.state_dict(), "rotated.pth") == []


# ---------------------------------------------------------------------------------------------
# PixMix
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_fractals_lie_in_0_1_are_not_flat_and_are_drawn_again_the_same():
    out = fractals(4, 3, (40, 40), torch.Generator().manual_seed(0), "cpu")
    assert out.shape == (4, 3, 40, 40) and out.min() >= 0 and out.max() <= 1
    assert all(o.std() > 0.01 for o in out)
    assert torch.equal(out, fractals(4, 3, (40, 40), torch.Generator().manual_seed(0), "cpu"))


@pytest.mark.quick
@pytest.mark.parametrize("channels_last", [False, True])
def test_pixmix_is_the_same_for_the_same_seed_and_step_and_keeps_unmixed_photos_bit_for_bit(channels_last):
    images = photos(16)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    mixer = PixMixer(4, 3.0, MEAN, STD, seed=5)
    a = mixer.mix(images, epoch=1, step=2)
    assert a.shape == images.shape and a.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(a, mixer.mix(images, epoch=1, step=2))  # a resumed run mixes the same
    for other in (mixer.mix(images, 1, 3), mixer.mix(images, 2, 2), PixMixer(4, 3.0, MEAN, STD, 6).mix(images, 1, 2),
                  PixMixer(4, 3.0, MEAN, STD, 5, rank=1).mix(images, 1, 2)):
        assert not torch.equal(a, other)
    kept = [torch.equal(x, y) for x, y in zip(images, a)]
    assert 0 < sum(kept) < len(kept)  # 0 rounds: about 1 photo in 5 (4 of 16 here) is left as it was
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (a >= low.view(1, 3, 1, 1) - 1e-5).all() and (a <= high.view(1, 3, 1, 1) + 1e-5).all()


@pytest.mark.quick
def test_a_larger_beta_keeps_more_of_the_photo():
    images = photos(32)
    change = {beta: (PixMixer(4, beta, MEAN, STD, seed=0).mix(images, 0, 0) - images).abs().mean().item()
              for beta in (1.0, 30.0)}
    assert change[30.0] < change[1.0] / 2


# ---------------------------------------------------------------------------------------------
# Energy margins
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_the_energy_loss_is_zero_once_the_margins_are_met_and_grows_with_the_shortfall():
    margins = (-10.0, -3.0)
    sure = torch.tensor([[12.0, 0.0, 0.0]])  # energy about -12: below m_in
    flat = torch.zeros(1, 3)  # energy -log 3: above m_out
    assert energy(sure).item() < -10 and energy(flat).item() > -3
    assert energy_margin_loss(sure, flat, margins).item() == 0
    photo_short = energy_margin_loss(torch.tensor([[8.0, 0.0, 0.0]]), flat, margins)  # 2 short of m_in
    outlier_short = energy_margin_loss(sure, torch.tensor([[5.0, 0.0, 0.0]]), margins)  # 2 short of m_out
    further = energy_margin_loss(torch.tensor([[4.0, 0.0, 0.0]]), flat, margins)
    assert 0 < photo_short.item() < further.item() and outlier_short.item() > 0
    photo = torch.tensor([[8.0, 0.0, 0.0]], requires_grad=True)
    outlier = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)
    energy_margin_loss(photo, outlier, margins).backward()
    assert (photo.grad < 0).all() and (outlier.grad > 0).all()  # the photo's logits up, the outlier's down


@pytest.mark.quick
def test_the_outliers_loss_takes_the_energy_margins_on_every_head():
    photo_rows, outlier_rows = torch.full((2, 3), 12.0), torch.zeros(3, 3)
    outputs = tuple(torch.cat([photo_rows + k, outlier_rows]) for k in range(3))  # logits, aux2, aux1
    heads = [energy_margin_loss(o[:2], o[2:], (-20.0, -3.0)) for o in outputs]
    got = outlier_loss(outputs, 2, 0.3, margins=(-20.0, -3.0))
    assert got.item() == pytest.approx((heads[0] + 0.3 * (heads[1] + heads[2])).item())
    assert outlier_loss(outputs, 2, 0.3).item() == pytest.approx(1.6 * math.log(3))  # uniform: log 3 a head


# ---------------------------------------------------------------------------------------------
# The "not sure" score
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_each_score_is_computed_from_the_calibrated_logits():
    logits = np.array([[4.0, 1.0, 0.0], [0.5, 0.4, 0.3]])
    t = 2.0
    p = calibration.softmax(logits, t)
    assert calibration.sureness("max_probability", logits, t) == pytest.approx(p.max(axis=1))
    assert calibration.sureness("energy", logits, t) == pytest.approx(t * np.log(np.exp(logits / t).sum(axis=1)))
    agreement = np.array([-0.1, -1.3])
    kl = (np.log(1 / 3) - np.log(p)).mean(axis=1)  # KL(uniform || p)
    assert calibration.sureness("rotation", logits, t, agreement) == pytest.approx(kl + agreement)
    with pytest.raises(ValueError):
        calibration.sureness("rotation", logits, t)


@pytest.mark.quick
@pytest.mark.parametrize("score", calibration.SCORES)
def test_the_score_and_its_threshold_travel_through_the_checkpoint_and_the_onnx_metadata(score):
    sure = np.array([3.0, -1.0, 2.0, 0.5] * 10)
    threshold = calibration.choose_min_confidence(sure, 0.95, score)
    recorded = Calibration(0.7, threshold, score)
    assert calibration.of_metadata(recorded.metadata()) == recorded
    assert calibration.of_checkpoint({"temperature": 0.7, "min_confidence": threshold,
                                      "not_sure_score": score}) == recorded
    none = calibration.of_checkpoint({"not_sure_score": score})  # a run whose val images were too few to fit
    assert none.answers_all and none.min_confidence == calibration.no_threshold(score)
    assert calibration.choose_min_confidence(sure[:5], 0.95, score) == calibration.no_threshold(score)
    assert calibration.of_metadata({"not_sure_score": "astrology"}) is None


@pytest.mark.quick
def test_the_decided_class_follows_the_score_and_min_confidence_switches_to_the_top_probability():
    classes = ["daisy", "roses"]
    p = np.array([0.9, 0.1])
    assert classify.decided_class(classes, p, 5.0, sureness=4.0) == "unknown"  # sure by probability, not energy
    assert classify.decided_class(classes, p, 5.0, sureness=6.0) == "daisy"
    assert classify.decided_class(classes, p, -math.inf, sureness=-1e9) == "daisy"
    used = Calibration(1.0, 5.0, "energy").with_min_confidence(0.95)
    assert used == Calibration(1.0, 0.95, "max_probability")
    assert classify.decided_class(classes, p, used.min_confidence) == "unknown"


# ---------------------------------------------------------------------------------------------
# Training with them
# ---------------------------------------------------------------------------------------------
ALL = ["--logit-norm", 0.25, "--pixmix", 4, "--rotation-weight", 0.5, "--outliers", 4, "--outlier-loss", "energy",
       "--not-sure-score", "rotation"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("trust") / "data", n_train=4, n_val=2)  # 3 steps of 4 an epoch


@pytest.fixture(scope="module")
def spied(tree, tmp_path_factory):
    """One epoch of 3 steps with LogitNorm and the rotation head, in micro-batches of 2, recording what
    the class loss and the rotation loss were given and which copies were turned."""
    seen = {"class_logits": [], "rotated": [], "turns": [], "inputs": []}
    with pytest.MonkeyPatch.context() as m:
        original_loss, original_make = recipe.ClassWeightedLoss.forward, Rotator.make
        original_rotation_loss, original_forward = step.rotation_loss, GoogLeNet.forward

        def class_loss(self, logits, targets):
            seen["class_logits"].append(recipe.normalized_logits(logits, self.logit_norm).detach()
                                        if self.logit_norm else None)
            return original_loss(self, logits, targets)

        def make(self, images, epoch, step):
            made = original_make(self, images, epoch, step)
            seen["rotated"].append((images.clone(), made))
            return made

        def loss_of_turns(logits, photos, turns=None):
            seen["turns"].append(turns)
            return original_rotation_loss(logits, photos, turns)

        def forward(self, x):
            if self.training:
                seen["inputs"].append(x.detach().clone())
            return original_forward(self, x)

        m.setattr(recipe.ClassWeightedLoss, "forward", class_loss)
        m.setattr(Rotator, "make", make)
        m.setattr(step, "rotation_loss", loss_of_turns)  # where the step weighs the rotation loss
        m.setattr(GoogLeNet, "forward", forward)
        out = tmp_path_factory.mktemp("spied")
        code, stdout, err = call(train, train_argv(tree, out, "--image-size", 32, "--logit-norm", 0.5,
                                                   "--rotation-weight", 1, "--rotation-share", 0.5,
                                                   "--micro-batch", 2, "--no-model-ema"))
    assert code == 0, err
    return {**seen, "stdout": stdout, "out": out}


def test_logit_norm_gives_every_heads_loss_logits_of_the_set_norm(spied):
    training_calls = spied["class_logits"][:3 * 2 * 3]  # 3 steps x 2 chunks x 3 heads; validation comes after
    assert len(training_calls) == 18 and all(c is not None for c in training_calls)
    for normalized in training_calls:
        assert normalized.norm(dim=1) == pytest.approx(torch.full((len(normalized),), 2.0), rel=1e-4)  # 1 / 0.5
    assert "LogitNorm (every head's loss sees logits of norm 1/0.5)" in spied["stdout"]
    assert load(spied["out"] / "best.pth")["args"]["logit_norm"] == 0.5


def test_the_rotation_heads_labels_are_the_turns_of_the_copies_the_model_ran_on(spied):
    assert len(spied["rotated"]) == 3  # once a step
    chunks = iter(zip(spied["turns"], spied["inputs"]))
    for images, made in spied["rotated"]:
        assert len(made.turns) == 2  # half of 4
        given, ran = [], []
        for _ in range(2):  # the step's two micro-batches of 2 photos
            turns, inputs = next(chunks)
            if turns is not None:
                given.append(turns)
                ran.append(inputs[len(inputs) - len(turns):])
        assert torch.equal(torch.cat(given), made.turns)
        for copy, turn, pick in zip(torch.cat(ran), made.turns.tolist(), made.picks.tolist()):
            assert torch.equal(copy, torch.rot90(images[pick], turn, dims=(1, 2)))
    assert "a rotation head (weight 1, 50% of each batch turned)" in spied["stdout"]
    best = load(spied["out"] / "best.pth")
    assert best["model"]["rotation.weight"].shape[0] == 4


def test_the_new_options_are_off_by_default_and_the_start_up_line_says_nothing(small_run):
    args = load(small_run["best"])["args"]
    assert (args["logit_norm"], args["pixmix"], args["rotation_weight"], args["outlier_loss"],
            args["not_sure_score"]) == (0.0, 0, 0.0, "uniform", "energy")
    assert not any(k.startswith("rotation.") for k in load(small_run["best"])["model"])
    assert "not sure:" not in small_run["stdout"]


@pytest.fixture(scope="module")
def stopped(tree, tmp_path_factory):
    """Every option on, 2 epochs: whole, and stopped after step 4 (mid-epoch 2)."""
    root = tmp_path_factory.mktemp("stopped")
    whole, cut = root / "whole", root / "cut"
    argv = [*ALL, "--image-size", 32, "--micro-batch", 2]
    code, stdout, err = call(train, train_argv(tree, whole, *argv, epochs=2))
    assert code == 0, err
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stopping.StopRequest, "check", stop_after_step(4, cut, root / "unused.pth"))
        code, _, err = call(train, train_argv(tree, cut, *argv, epochs=2))
    assert code == 128 + signal.SIGTERM, err
    return {"whole": whole, "cut": cut, "stdout": stdout}


def test_every_option_on_resumes_mid_epoch_bit_for_bit(stopped, tmp_path):
    shutil.copytree(stopped["cut"], tmp_path / "cut")
    code, stdout, err = call(train, ["--resume", tmp_path / "cut" / "last.pth"])
    assert code == 0, err
    assert "epoch 2, step 1" in stdout
    whole, resumed = load(stopped["whole"] / "last.pth"), load(tmp_path / "cut" / "last.pth")
    for key in ("model", "model_ema"):
        different = [k for k in whole[key] if not torch.equal(whole[key][k], resumed[key][k])]
        assert not different, different[:3]
    line = next(s for s in stopped["stdout"].splitlines() if s.startswith("not sure:"))
    for words in ("LogitNorm", "PixMix with generated pictures (0 to 4 rounds, beta 3)", "a rotation head",
                  "4 outliers a step (energy margins -7 / -2, weight 0.1)", "\"not sure\" score rotation"):
        assert words in line


@pytest.mark.parametrize("option, value", [("--logit-norm", "0.5"), ("--pixmix", "2"), ("--rotation-weight", "1.5"),
                                           ("--outlier-loss", "uniform"), ("--not-sure-score", "energy")])
def test_resume_refuses_to_change_them(stopped, option, value):
    code, _, err = call(train, ["--resume", stopped["cut"] / "last.pth", option, value])
    assert_clean_error(code, err, f"{option} {value} differs from the run's")


@pytest.mark.quick
@pytest.mark.parametrize("argv, words", [
    (["--not-sure-score", "rotation"], "--not-sure-score rotation needs the rotation head"),
    (["--energy-margins", "-7", "-25"], "M_IN must lie below the outliers' M_OUT, got -7 -25"),
])
def test_options_that_cannot_work_together_are_one_argparse_line(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        train.run(argv)
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in line and words in line


# ---------------------------------------------------------------------------------------------
# The score at prediction time: predict.py, --sort-into, the page and the .onnx file agree
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 1-epoch run with the rotation head and the rotation score on 2 classes with 24 val photos (a
    threshold is fitted), and 12 photos of neither class."""
    root = tmp_path_factory.mktemp("scored")
    data = make_tree(root / "data", classes=("daisy", "roses"), n_train=4, n_val=12)
    others = root / "others"
    for i in range(12):
        save_image(others / f"other_{i:02d}.png", COLORS[2 + i % 3], seed=900 + i)
    out = root / "out"
    code, _, err = call(train, train_argv(data, out, "--image-size", 32, "--rotation-weight", 0.5,
                                          "--not-sure-score", "rotation", "--no-model-ema"))
    assert code == 0, err
    files = sorted(str(p) for p in (data / "val").rglob("*.jpg")) + sorted(str(p) for p in others.iterdir())
    return {"best": out / "best.pth", "data": data, "files": files, "root": root}


def sorted_classes(folder):
    return {p.name: p.parent.name for p in folder.rglob("*") if p.is_file()}


def test_best_pth_records_the_rotation_score_and_predict_decides_by_it(scored, tmp_path):
    best = load(scored["best"])
    assert best["not_sure_score"] == "rotation" and best["min_confidence"] > -math.inf
    classifier = classify.load_classifier(str(scored["best"]), device="cpu", amp="off")
    assert classifier.calibration == Calibration(best["temperature"], best["min_confidence"], "rotation")
    probabilities, errors, sureness = classify.predict(classifier, scored["files"], 8, 0, sureness=True)
    assert not any(errors)
    val = len(scored["files"]) - 12
    assert (sureness[:val] >= best["min_confidence"]).sum() == math.ceil(0.95 * val)  # as fitted: 95% answered
    expected = [classify.decided_class(["daisy", "roses"], p, best["min_confidence"], s)
                for p, s in zip(probabilities, sureness)]
    code, _, err = call(predict, [*scored["files"], "--weights", scored["best"], "--sort-into", tmp_path / "pth",
                                  "--output", tmp_path / "p.csv", "--device", "cpu", "--amp", "off"])
    assert code == 0, err
    assert [sorted_classes(tmp_path / "pth")[f.rsplit("/", 1)[1]] for f in scored["files"]] == expected
    assert "unknown" in expected  # the threshold refuses at least one photo


@needs("onnx", "onnxruntime", "onnxscript", why="the .onnx export needs them: requirements-dev.txt")
def test_the_onnx_export_carries_the_score_and_sorts_the_photos_as_the_pth_does(scored, tmp_path):
    import app
    import export

    onnx_path = tmp_path / "model.onnx"
    code, _, err = call(export, ["--weights", scored["best"], "--output", onnx_path])
    assert code == 0, err
    from inference.runtimes import OnnxModel

    assert OnnxModel(str(onnx_path)).metadata["not_sure_score"] == "rotation"
    for weights, folder in ((scored["best"], "pth"), (onnx_path, "onnx")):
        code, _, err = call(predict, [*scored["files"], "--weights", weights, "--sort-into", tmp_path / folder,
                                      "--amp", "off"])
        assert code == 0, err
    assert sorted_classes(tmp_path / "pth") == sorted_classes(tmp_path / "onnx")
    demo = app.Demo(classify.load_classifier(str(onnx_path)), "inception5b")
    for f in scored["files"]:
        _, _, note = demo.classify(f)
        assert note.startswith("**Not sure**") == (sorted_classes(tmp_path / "onnx")[f.rsplit("/", 1)[1]] == "unknown")


def test_eval_only_calibrate_stores_another_score_and_predict_uses_it(scored, tmp_path):
    weights = tmp_path / "best.pth"
    shutil.copy(scored["best"], weights)
    code, stdout, err = call(train, ["--eval-only", "--calibrate", "--weights", weights, "--data-path",
                                     scored["data"], "--not-sure-score", "energy", "--output-dir", tmp_path / "eval",
                                     "--device", "cpu", "--workers", 0, "--unknowns", scored["root"] / "others"])
    assert code == 0, err
    stored = load(weights)
    assert stored["not_sure_score"] == "energy"
    assert "of the energy score" in stdout and "AUROC of each score: max_probability" in stdout
    assert "rotation" in stdout.split("AUROC of each score:")[1]  # the head is there: its score is measured too
    classifier = classify.load_classifier(str(weights), device="cpu", amp="off")
    assert classifier.calibration == Calibration(stored["temperature"], stored["min_confidence"], "energy")
    val = scored["files"][:-12]  # the photos it was fitted on (--eval-only scores the run's val photos)
    probabilities, _, sureness = classify.predict(classifier, val, 8, 0, sureness=True)
    logits = np.log(probabilities) * stored["temperature"]  # the logits up to a constant a row: no energy
    assert not np.allclose(sureness, calibration.sureness("energy", logits, stored["temperature"]))
    assert (sureness >= stored["min_confidence"]).sum() == math.ceil(0.95 * len(val))
