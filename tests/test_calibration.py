"""Calibrated probabilities and the "not sure" threshold: the temperature fit, the ECE, the threshold
rule, what training stores in best.pth, predict.py's "unknown", and a .onnx file that carries both.

One tiny 2-class model is trained for the module (a plain folder of 24 photos per class, half of
them held out: 24 val photos, enough for a fit and a threshold that refuses one)."""
import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import predict
import train
from helpers import (
    CLASSES,
    COLORS,
    FP32,
    REPO,
    assert_clean_error,
    call,
    eval_argv,
    load,
    make_tree,
    save_image,
    train_argv,
    write_corrupt,
)
from inference import calibration, classify, images
from inference import checkpoint as ckpt
from inference.images import Preprocessing
from model import GoogLeNet
from plumbing.run_lock import LOCK_NAME

PER_CLASS = 24
VAL_RATIO = 0.5


# ---------------------------------------------------------------------------------------------
# the numbers, by hand
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_the_fit_recovers_a_known_temperature(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    p = calibration.softmax(logits.astype(np.float64), true_temperature)
    labels = np.array([rng.choice(5, p=row) for row in p])
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.06)
    # it is the NLL's minimum: a step either way costs more
    best = calibration.nll(logits, labels, fitted)
    assert best < calibration.nll(logits, labels, fitted * 1.02)
    assert best < calibration.nll(logits, labels, fitted / 1.02)


def test_no_finite_temperature_when_every_image_is_right():
    logits = np.array([[3.0, 0.0], [0.0, 2.0]])
    assert calibration.fit_temperature(logits, np.array([0, 1])) is None


def test_ece_by_hand():
    # top probabilities 0.95 (right), 0.9 (wrong), 0.6 (right), 0.55 (right), 0.3 (wrong, 3 classes)
    probabilities = [[0.95, 0.05, 0.0], [0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.55, 0.45, 0.0], [0.3, 0.3, 0.4]]
    labels = [0, 1, 1, 0, 0]
    # 15 bins of width 1/15: 0.95 and 0.9 fall in (14/15, 1] and (13/15, 14/15]; 0.6 in (8/15, 9/15];
    # 0.55 in (8/15, 9/15] too; 0.4 in (5/15, 6/15]
    expected = (1 * abs(1 - 0.95) + 1 * abs(0 - 0.9) + 2 * abs(1 - (0.6 + 0.55) / 2) + 1 * abs(0 - 0.4)) / 5
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    table = calibration.reliability_table(probabilities, labels)
    assert [n for n, _, _ in table] == [0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 1, 1]
    # one bin: |accuracy - confidence| of the whole set
    assert calibration.expected_calibration_error([[0.7, 0.3]] * 4, [0, 0, 0, 1], bins=1) == pytest.approx(0.05)


def test_the_threshold_answers_95_percent_and_lies_between_two_photos():
    top = np.linspace(0.5, 0.99, 40)
    threshold = calibration.choose_min_confidence(top)
    assert (top >= threshold).sum() == 38  # floor(0.05 * 40) = 2 refused
    assert top[1] < threshold < top[2] and threshold == pytest.approx((top[1] + top[2]) / 2)
    assert calibration.choose_min_confidence(top[:19]) == 0.0  # 5% of 19 is no whole photo: none refused


def test_risk_coverage_rows():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])  # right, wrong, right, wrong in that order of confidence: .9 .8 .7 .55
    rows = calibration.risk_coverage(probabilities, labels, coverages=(1.0, 0.75, 0.5))
    assert rows == [(1.0, 0.55, 4, 0.5), (0.75, 0.7, 3, pytest.approx(2 / 3)), (0.5, 0.8, 2, 0.5)]


# ---------------------------------------------------------------------------------------------
# --eval-only --calibrate writes into the folder of --weights: that folder's lock
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def untrained_run(tmp_path):
    """tmp_path/run/best.pth of an untrained 3-class GoogLeNet (nothing is trained in the quick tier)
    and tmp_path/test, 7 photos a class to score it on: more than calibration.MIN_FIT_IMAGES."""
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=len(CLASSES), aux_logits=True, init_weights=True, variant="torchvision")
    record = ckpt.Record(list(CLASSES), "torchvision", (32, 32), images.Preprocessing(32, 32), None, {})
    (tmp_path / "run").mkdir()
    ckpt.save_checkpoint(record.describe(model), str(tmp_path / "run" / "best.pth"))
    for k, name in enumerate(CLASSES):
        for i in range(7):
            save_image(tmp_path / "test" / name / f"{name}_{i}.jpg", COLORS[k], seed=10 * k + i, size=(32, 32))
    return tmp_path / "run"


HOLD = """
import os, sys, time
from plumbing.run_lock import RunLock
with RunLock(sys.argv[1], purpose="training"):
    open(sys.argv[2], "w").close()
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.01)
"""


@pytest.mark.quick
def test_calibrating_the_weights_of_a_run_still_training_is_refused(untrained_run, tmp_path):
    before = (untrained_run / "best.pth").read_bytes()
    ready, let_go = tmp_path / "ready", tmp_path / "let-go"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(untrained_run), str(ready), str(let_go)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()
            time.sleep(0.01)
        code, out, err = call(train, eval_argv(untrained_run / "best.pth", tmp_path / "test", tmp_path / "ev",
                                               "--calibrate"))
    finally:
        let_go.touch()
        holder.wait(timeout=30)
    assert_clean_error(code, err, f"{untrained_run} is in use by another process: training, pid {holder.pid}",
                       f"kill {holder.pid}", "calibrate a copy")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert (untrained_run / "best.pth").read_bytes() == before
    assert not (tmp_path / "ev").exists()  # refused before its output folder was made


@pytest.mark.parametrize("output_dir", [pytest.param("ev", id="another-output-dir", marks=pytest.mark.quick),
                                        pytest.param("run", id="the-run-itself")])
def test_calibration_holds_the_lock_of_the_folder_it_writes(untrained_run, tmp_path, monkeypatch, output_dir):
    """From before the weights are read (what is calibrated is what is rewritten) to after they are saved."""
    held, read_under = [], []
    real_save, real_load = ckpt.save_checkpoint, ckpt.load_checkpoint

    def save_checkpoint(obj, path, *args):
        held.append(json.loads((untrained_run / LOCK_NAME).read_text()))
        return real_save(obj, path, *args)

    def load_checkpoint(path, *args):
        if os.path.samefile(path, untrained_run / "best.pth"):
            read_under.append((untrained_run / LOCK_NAME).exists())
        return real_load(path, *args)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(ckpt, "load_checkpoint", load_checkpoint)
    code, out, err = call(train, eval_argv(untrained_run / "best.pth", tmp_path / "test", tmp_path / output_dir,
                                           "--calibrate"))
    assert code == 0, err
    assert "saved in" in out and "temperature" in load(untrained_run / "best.pth")
    assert len(held) == 1 and held[0]["pid"] == os.getpid(), held
    assert held[0]["purpose"] == "calibration"  # taken first, for the weights; --output-dir's too when the same
    assert read_under and all(read_under), read_under
    assert not (untrained_run / LOCK_NAME).exists()  # released at the end


# ---------------------------------------------------------------------------------------------
# a trained model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    photos = root / "photos"
    for k, name in enumerate(("daisy", "roses")):
        for i in range(PER_CLASS):
            save_image(photos / name / f"{name}_{i:02d}.jpg", COLORS[k], seed=k * 1000 + i, size=(48, 48))
    out = root / "out"
    code, stdout, err = call(train, train_argv(photos, out, "--image-size", 32, "--val-ratio", VAL_RATIO,
                                               "--batch-size", 8))
    assert code == 0, err
    best = load(out / "best.pth")
    val_files = [str(photos / f) for f in best["split"]["val_files"]]
    return {"root": root, "photos": photos, "best": out / "best.pth", "stdout": stdout, "val_files": val_files}


def val_probabilities(weights, files):
    classifier, probabilities, _ = val_scores(weights, files)
    return classifier, probabilities


def val_scores(weights, files):
    """The classifier, the calibrated probabilities and the "not sure" score (the weights' own) of files."""
    classifier = classify.load_classifier(str(weights), device="cpu", amp="off")
    probabilities, errors, sureness = classify.predict(classifier, files, 8, 0, sureness=True)
    assert errors == [""] * len(files)
    return classifier, probabilities, sureness


def test_training_stores_a_temperature_and_a_threshold_that_answers_95_percent_of_val(run):
    best = load(run["best"])
    n = len(run["val_files"])
    assert n == 2 * PER_CLASS * VAL_RATIO
    assert best["not_sure_score"] == calibration.DEFAULT_SCORE == "energy"  # docs/trust.md chose it
    assert 0.05 <= best["temperature"] <= 20 and math.isfinite(best["min_confidence"])
    assert best["calibration"]["images"] == n and best["calibration"]["ece_bins"] == 15
    assert f"calibration on the {n} val images" in run["stdout"]
    classifier, probabilities, sureness = val_scores(run["best"], run["val_files"])
    assert classifier.calibration == calibration.Calibration(best["temperature"], best["min_confidence"], "energy")
    # the energy score: T x log-sum-exp(logits / T), which softmax's probabilities alone cannot give
    logits = torch.cat([logits_of(run["best"], f) for f in run["val_files"]]).double().numpy()
    assert sureness == pytest.approx(calibration.sureness("energy", logits, best["temperature"]), abs=1e-4)
    answered = sureness >= best["min_confidence"]
    assert answered.sum() == n - math.floor(0.05 * n) and answered.mean() >= 0.95
    # the probabilities shown are softmax(logits / T): the fitted T is the NLL's minimum on val
    labels = np.array([0 if "/daisy/" in f else 1 for f in run["val_files"]])
    logits = np.log(probabilities.astype(np.float64)) * best["temperature"]  # logits up to a constant per row
    nll = calibration.nll(logits, labels, best["temperature"])
    assert nll == pytest.approx(best["calibration"]["nll_after"], abs=1e-4)
    if "no finite temperature" not in best["calibration"]["note"]:
        low, high = calibration.TEMPERATURE_RANGE  # a fit on a bound has its minimum beyond it
        for other in (best["temperature"] * 1.05, best["temperature"] / 1.05):
            if low <= other <= high:  # 1e-6: the logits come back from float32 probabilities
                assert nll <= calibration.nll(logits, labels, other) + 1e-6


def test_eval_only_calibrate_fits_old_weights_as_training_does(run, tmp_path):
    old = {k: v for k, v in load(run["best"]).items() if k not in ("temperature", "min_confidence", "calibration")}
    weights = tmp_path / "old.pth"
    torch.save(old, weights)
    code, stdout, err = call(train, [*FP32, "--eval-only", "--weights", weights, "--data-path", run["photos"],
                                     "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert code == 0, err
    assert "temperature 1 (none in" in stdout and "--calibrate fits one" in stdout
    code, stdout, err = call(train, [*FP32, "--eval-only", "--calibrate", "--weights", weights, "--data-path",
                                     run["photos"], "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert code == 0, err
    fitted, trained = load(weights), load(run["best"])
    assert fitted["temperature"] == pytest.approx(trained["temperature"], rel=1e-4)
    assert fitted["min_confidence"] == pytest.approx(trained["min_confidence"], abs=1e-5)
    assert torch.equal(fitted["model"]["fc.weight"], trained["model"]["fc.weight"])
    assert f"fitted here on these {len(run['val_files'])} images" in stdout
    code, _, err = call(train, [*FP32, "--eval-only", "--calibrate", "--tta", "--weights", weights, "--data-path",
                                run["photos"], "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert_clean_error(code, err, "--calibrate", "--tta")


# ---------------------------------------------------------------------------------------------
# --calibrate on the pixels predict.py will see; --eval-only with --resume
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A best.pth as train.py writes it (untrained weights: no training needed) that records evaluation at
    40 px crops of images resized to 48, and a split tree with 21 val images, enough for a fit."""
    root = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=len(CLASSES), aux_logits=True, variant="torchvision")
    record = ckpt.Record(list(CLASSES), "torchvision", (32, 32), Preprocessing(48, 40), None, {})
    torch.save(record.describe(model), root / "best.pth")
    return {"best": root / "best.pth", "data": make_tree(root / "data", n_train=1, n_val=7), "root": root}


def calibrate_argv(weights, data, out, *extra):
    return [*FP32, "--eval-only", "--calibrate", "--weights", weights, "--data-path", data, "--output-dir", out,
            "--device", "cpu", "--workers", 0, *extra]


@pytest.mark.quick
@pytest.mark.parametrize("sizes", [["--val-crop", 36], ["--val-resize", 56], ["--val-crop", 40]])
def test_calibrate_refuses_other_pixels_than_predict_sees(untrained, tmp_path, sizes):
    """--calibrate with another --val-crop or --val-resize than the weights record fitted the temperature
    on other pixels than predict.py (which uses the recorded ones) feeds the model, and stored it. (A
    --val-crop 40 alone is another resize too: the crop is then taken from images resized to 40.)"""
    weights = tmp_path / "best.pth"
    weights.write_bytes(untrained["best"].read_bytes())
    code, _, err = call(train, calibrate_argv(weights, untrained["data"], tmp_path / "ev", *sizes))
    assert_clean_error(code, err, "--calibrate", f"{sizes[0]} {sizes[1]}", "40 px crops of images resized to 48")
    assert weights.read_bytes() == untrained["best"].read_bytes()


def test_calibrate_takes_the_recorded_sizes_given_again(untrained, tmp_path):
    weights = tmp_path / "best.pth"
    weights.write_bytes(untrained["best"].read_bytes())
    code, stdout, err = call(train, calibrate_argv(weights, untrained["data"], tmp_path / "ev",
                                                   "--val-crop", 40, "--val-resize", 48))
    assert code == 0, err
    assert "evaluation at 40 px" in stdout and "fitted here on these 21 images" in stdout
    assert "temperature" in load(weights)


@pytest.mark.quick
@pytest.mark.parametrize("calibrate", [[], ["--calibrate"]])
def test_eval_only_with_resume_is_one_line(untrained, tmp_path, calibrate):
    """--eval-only --resume R --weights W, with W the run's own --weights, ran --eval-only on the run's
    freshly initialised model (neither file's weights loaded) and crashed in the calibration step."""
    run = tmp_path / "run"
    run.mkdir()
    recorded = vars(train.get_args_parser().parse_args(
        train_argv(untrained["data"], run, "--image-size", 32, "--weights", untrained["best"])))
    last = dict(load(untrained["best"]), args={**recorded, "cwd": str(tmp_path)}, optimizer={}, rng=[None])
    torch.save(last, run / "last.pth")
    code, _, err = call(train, [*FP32, "--eval-only", *calibrate, "--resume", run / "last.pth", "--weights",
                                untrained["best"], "--device", "cpu", "--workers", 0])
    assert_clean_error(code, err, "--eval-only", "--resume", "--weights")
    assert sorted(p.name for p in run.iterdir()) == ["last.pth"]


@pytest.fixture
def tf32_settings_kept():
    """The TF32 settings as they were before the test, put back after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_settings_kept")
def test_the_temperature_is_fitted_on_fp32_logits_without_tf32_or_autocast(run, tmp_path, monkeypatch):
    """On CUDA tune_backends lets matmuls and convolutions run in TF32 (cuDNN's convolutions do by default):
    the logits a temperature is fitted on are computed without it and without autocast, when training
    ends (here a bf16 run) and with --eval-only --calibrate (under --amp auto, which picks bf16 here);
    the settings are as they were afterwards. The flags are set here as tune_backends sets them on CUDA."""
    from model import GoogLeNet
    from plumbing import device as dev
    from training import evaluation

    def precision():
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.is_autocast_enabled("cpu"))

    seen, phase = {}, []
    real_forward, real_tune = GoogLeNet.forward, dev.tune_backends

    def recording_forward(self, x):
        seen.setdefault(phase[-1] if phase else "other", set()).add(precision())
        return real_forward(self, x)

    def tune_as_on_cuda(device):
        real_tune(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def in_phase(name, function):
        def wrapper(*args, **kwargs):
            phase.append(name)
            try:
                return function(*args, **kwargs)
            finally:
                phase.pop()
        return wrapper

    monkeypatch.setattr(GoogLeNet, "forward", recording_forward)
    monkeypatch.setattr(dev, "tune_backends", tune_as_on_cuda)
    monkeypatch.setattr(evaluation, "calibrate_best", in_phase("training's fit", evaluation.calibrate_best))
    monkeypatch.setattr(evaluation, "evaluate_only", in_phase("--calibrate", evaluation.evaluate_only))
    code, _, err = call(train, train_argv(run["photos"], tmp_path / "bf16", "--image-size", 32, "--val-ratio",
                                          VAL_RATIO, "--batch-size", 8, amp="bf16"))
    assert code == 0, err
    assert seen["other"] == {(True, True, True)}  # training and validation: TF32 and autocast
    assert seen["training's fit"] == {(False, False, False)}
    assert precision()[:2] == (True, True)
    monkeypatch.setenv(dev.BF16_OVERRIDE, "1")  # --amp auto would pick bf16 on this CPU
    code, _, err = call(train, ["--eval-only", "--calibrate", "--weights", tmp_path / "bf16" / "best.pth",
                                "--data-path", run["photos"], "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert code == 0, err
    assert seen["--calibrate"] == {(False, False, False)}
    assert precision()[:2] == (True, True)


def noise_image(path, seed=5):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_answers_unknown_below_the_threshold(run, tmp_path):
    noise = noise_image(tmp_path / "photos" / "noise.png")  # a folder of its own: --sort-into lies outside it
    photo = run["val_files"][0]
    out = tmp_path / "p.csv"
    code, stdout, err = call(predict, [*FP32, noise, photo, "--weights", run["best"], "--min-confidence", 0.99,
                                       "--output", out, "--sort-into", tmp_path / "sorted"])
    assert code == 0, err
    with open(out, newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    _, probabilities = val_probabilities(run["best"], [str(noise), photo])
    for f, p in zip((str(noise), photo), probabilities):
        assert float(rows[f]["probability"]) == pytest.approx(p.max(), abs=1e-6)
        assert [float(rows[f][c]) for c in ("daisy", "roses")] == pytest.approx(p.tolist(), abs=1e-6)
        assert rows[f]["class"] == ("unknown" if p.max() < 0.99 else ("daisy", "roses")[p.argmax()])
    assert rows[str(noise)]["class"] == "unknown"  # two classes: a top probability of 0.99 takes a very sure model
    assert (tmp_path / "sorted" / "unknown" / "noise.png").exists()
    code, stdout, err = call(predict, [*FP32, noise, "--weights", run["best"], "--min-confidence", 0.99])
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("unknown (not sure): best guesses")
    assert sorted(line.split()[0] for line in lines[1:]) == ["daisy", "roses"]
    # 0 turns it off: the most likely class, whatever its probability
    json_out = tmp_path / "p.json"
    code, stdout, err = call(predict, [*FP32, noise, "--weights", run["best"], "--min-confidence", 0,
                                       "--output", json_out])
    assert code == 0, err
    (row,) = json.loads(json_out.read_text())
    assert row["class"] == ("daisy", "roses")[int(probabilities[0].argmax())]
    assert not stdout.startswith("unknown")


def test_predict_uses_the_weights_threshold_by_default(run, tmp_path):
    best = load(run["best"])
    out = tmp_path / "p.csv"
    code, _, err = call(predict, [*FP32, *run["val_files"], "--weights", run["best"], "--output", out])
    assert code == 0, err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    unknown = {r["file"] for r in rows if r["class"] == "unknown"}
    assert len(unknown) == math.floor(0.05 * len(rows))  # the val photos the threshold refuses
    _, _, sureness = val_scores(run["best"], run["val_files"])
    assert unknown == {f for f, s in zip(run["val_files"], sureness) if s < best["min_confidence"]}


def test_eval_only_reports_how_well_the_threshold_tells_unknowns_from_the_test_images(run, tmp_path):
    import re

    unknowns = tmp_path / "unknowns"
    noisy = [str(noise_image(unknowns / "a" / f"n{i}.png", seed=i)) for i in range(6)]  # found in subfolders too
    (unknowns / "notes.txt").write_text("not an image")
    code, stdout, err = call(train, [*FP32, "--eval-only", "--weights", run["best"], "--data-path", run["photos"],
                                     "--output-dir", tmp_path / "ev", "--device", "cpu", "--unknowns", unknowns])
    assert code == 0, err
    best = load(run["best"])
    _, _, top = val_scores(run["best"], noisy + run["val_files"])  # the weights' own score (energy)
    unknown_top, known_top = top[:len(noisy)], top[len(noisy):]
    k, u = known_top[:, None], unknown_top[None, :]
    pairs = (k > u).mean() + 0.5 * (k == u).mean()  # the AUROC by its definition
    found = re.search(rf"unknowns: 6 images of {re.escape(str(unknowns))}, .*: AUROC ([0-9.]+) .* the "
                      rf"{len(known_top)} test images from them", stdout)
    assert found, stdout
    assert float(found.group(1)) == pytest.approx(pairs, abs=1e-4)
    t = best["min_confidence"]
    caught, answered = 100 * (unknown_top < t).mean(), 100 * (known_top >= t).mean()
    assert f"at the \"not sure\" threshold ({t:.4f}): {caught:.1f}% of the unknowns caught (answered unknown), " \
           f"{answered:.1f}% of the known answered" in stdout


def test_unknowns_goes_with_eval_only_and_an_existing_folder(run, tmp_path):
    code, _, err = call(train, [*FP32, "--data-path", run["photos"], "--output-dir", tmp_path / "t", "--unknowns",
                                tmp_path])
    assert_clean_error(code, err, "--unknowns", "--eval-only")
    code, _, err = call(train, [*FP32, "--eval-only", "--weights", run["best"], "--data-path", run["photos"],
                                "--output-dir", tmp_path / "ev", "--unknowns", tmp_path / "missing"])
    assert_clean_error(code, err, "--unknowns", str(tmp_path / "missing"), "does not exist")
    broken = write_corrupt(tmp_path / "others" / "broken.jpg")  # --bad-images holds for them as for the test images
    noise_image(tmp_path / "others" / "noise.png")
    argv = [*FP32, "--eval-only", "--weights", run["best"], "--data-path", run["photos"], "--unknowns",
            tmp_path / "others"]
    code, _, err = call(train, argv + ["--output-dir", tmp_path / "e1", "--bad-images", "error"])
    assert_clean_error(code, err, f"cannot read image {broken}", "--bad-images skip")
    code, stdout, err = call(train, argv + ["--output-dir", tmp_path / "e2"])
    assert code == 0, err
    assert f"skipped 1 unreadable image(s): {broken}" in stdout and "unknowns: 1 images of" in stdout


def logits_of(weights, photo, class_indices="unused.json"):
    """The logits of one photo computed here in PyTorch, with the preprocessing the weights record."""
    from inference import images

    model, _, preprocessing = ckpt.load_model(str(weights), str(class_indices), torch.device("cpu"))
    pixels = images.resize_and_crop(images.load_image(photo), preprocessing)[None]
    x = torch.from_numpy(images.normalize(pixels, preprocessing)).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(x)


def test_weights_without_a_temperature_give_the_plain_softmax(run, tmp_path):
    state_dict = tmp_path / "plain.pth"
    torch.save(load(run["best"])["model"], state_dict)
    indices = tmp_path / "classes.json"
    ckpt.write_class_indices(str(indices), ["daisy", "roses"])
    classifier = classify.load_classifier(str(state_dict), str(indices), device="cpu", amp="off")
    assert classifier.calibration == calibration.Calibration(1.0, 0.0)
    photo = run["val_files"][0]
    got, _ = classify.predict(classifier, [photo], 1, 0)
    torch.testing.assert_close(torch.from_numpy(got), torch.softmax(logits_of(state_dict, photo, indices), 1))
    _, calibrated = val_probabilities(run["best"], [photo])
    temperature = load(run["best"])["temperature"]
    expected = torch.softmax(logits_of(run["best"], photo) / temperature, 1)
    torch.testing.assert_close(torch.from_numpy(calibrated), expected)


def test_an_onnx_file_carries_the_temperature_and_threshold(run, tmp_path):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx (requirements-dev.txt)")
    pytest.importorskip("onnxruntime", reason="ONNX export needs onnxruntime (requirements-dev.txt)")
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (requirements-dev.txt)")
    import export

    best = load(run["best"])
    path = tmp_path / "model.onnx"
    code, _, err = call(export, ["--weights", run["best"], "--output", path])
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert float(meta["temperature"]) == best["temperature"]
    assert float(meta["min_confidence"]) == best["min_confidence"]
    assert meta["not_sure_score"] == best["not_sure_score"]
    files = run["val_files"] + [str(noise_image(tmp_path / "noise.png"))]
    _, _, sureness = val_scores(run["best"], files)
    outputs = {}
    for name, weights in (("pth", run["best"]), ("onnx", path)):
        out = tmp_path / f"{name}.csv"
        code, _, err = call(predict, [*FP32, *files, "--weights", weights, "--output", out])
        assert code == 0, err
        with open(out, newline="") as f:
            outputs[name] = list(csv.DictReader(f))
    for a, b, score in zip(outputs["pth"], outputs["onnx"], sureness, strict=True):
        assert a["file"] == b["file"]
        for column in ("probability", "daisy", "roses"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-4)
        if abs(score - best["min_confidence"]) > 1e-4:  # the two runtimes may part on the threshold itself
            assert a["class"] == b["class"]
    assert classify.load_classifier(str(path)).calibration == calibration.Calibration(
        best["temperature"], best["min_confidence"], best["not_sure_score"])


def test_the_page_says_not_sure_with_the_best_guesses(run, tmp_path):
    pytest.importorskip("gradio", reason="the demo page needs gradio (requirements-dev.txt)")
    import app

    classifier = classify.load_classifier(str(run["best"]), device="cpu", amp="off")
    noise = str(noise_image(tmp_path / "noise.png"))
    classifier.calibration = classifier.calibration.with_min_confidence(0.99)
    top, _, note = app.Demo(classifier, "inception5b").classify(noise)
    assert note.startswith("**Not sure**") and "Best guesses: " in note
    assert sorted(top) == ["daisy", "roses"]
    best = max(top, key=top.get)
    assert f"Best guesses: {best} {top[best]:.2f}" in note
    classifier.calibration = classifier.calibration.with_min_confidence(0)
    _, _, note = app.Demo(classifier, "inception5b").classify(noise)
    assert "Not sure" not in note
