"""train.py and predict.py end to end, on tiny image trees: outputs, errors, resume, signals, download.

Offline and CPU only. GoogLeNet still sees 128 x 128 crops (160 for validation) with the default
recipe, so a step of 4 images costs about half a second on two cores: every run here is 1-2 epochs
of at most 12 images. Scripts run as
subprocesses where the process itself matters (exit codes, tracebacks, signals) and in-process
(``train.run(argv)``, ``predict.run(argv)``: the same code behind the same argument parser) where
speed matters; an exception escaping run() fails the test just as a traceback would.
"""
import csv
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch

import predict
import train
from helpers import (
    CLASSES,
    COLORS,
    FP32,
    PREDICT,
    REPO,
    TRAIN,
    assert_clean_error,
    call,
    last_line,
    load,
    make_tree,
    run_script,
    save_image,
    script_env,
    train_argv,
    write_corrupt,
    write_truncated_jpeg,
)
from inference import checkpoint as ckpt
from model import GoogLeNet
from training import data, download

METRIC_HEADER = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
                 "val_macro_f1", "images_per_s", "seconds"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def class_lines(out, classes=CLASSES):
    """predict.py's one-image output: [(class, probability)] in printed order."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in classes:
            rows.append((parts[0], float(parts[1])))
    return rows


# ---------------------------------------------------------------------------------------------
# one real training run, shared by the prediction tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train.py as a subprocess for one epoch on 12 train / 6 val images of 3 classes."""
    root = tmp_path_factory.mktemp("trained")
    data_dir = make_tree(root / "data")
    out = root / "out"
    proc = run_script(TRAIN, train_argv(data_dir, out, epochs=1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ci = out / "ci.json"
    return {"root": root, "data": data_dir, "out": out, "proc": proc, "best": out / "best.pth", "ci": ci}


def test_train_end_to_end(trained):
    out, proc = trained["out"], trained["proc"]
    assert "Traceback" not in proc.stderr
    for name in ("best.pth", "last.pth", "metrics.csv", "class_indices.json", "ci.json"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == METRIC_HEADER
    assert len(rows) == 2 and rows[1][0] == "1"
    assert 0.0 <= float(rows[1][3]) <= 1.0 and 0.0 <= float(rows[1][5]) <= 1.0  # train and val accuracy

    expected = {str(i): c for i, c in enumerate(sorted(CLASSES))}
    assert json.loads((out / "class_indices.json").read_text()) == expected
    assert json.loads(trained["ci"].read_text()) == expected

    best = load(out / "best.pth")
    for key in ("model", "classes", "variant", "image_size", "val_resize", "val_crop", "mean", "std", "args"):
        assert key in best, key
    assert best["classes"] == list(sorted(CLASSES))
    # the default recipe: torchvision's layout, 128 px crops, evaluation at 1.25 x 128, an EMA of the weights
    assert best["variant"] == "torchvision" and best["image_size"] == 128
    assert best["val_resize"] == best["val_crop"] == 160
    assert best["split"] is None  # a train/ + val/ tree: nothing held out by train.py
    assert any(k.startswith("aux1.") for k in best["model"])
    assert best["model"]["fc.weight"].shape[0] == 3

    last = load(out / "last.pth")
    assert last["epoch"] == 1 and last["step"] == 0 and "optimizer" in last and "model_ema" in last

    assert re.search(r"\[epoch 1\] train_loss: [\d.]+  train_accuracy: [\d.]+ .*val_accuracy: [\d.]+",
                     proc.stdout), proc.stdout[-2000:]
    assert re.search(r"best val_accuracy [\d.]+", last_line(proc.stdout))


# ---------------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------------
def test_predict_one_image_prints_every_class(trained):
    image = trained["data"] / "val" / "roses" / "roses_00.jpg"
    code, out, err = call(predict, [*FP32, image, "--weights", trained["best"], "--workers", "0"])
    assert code == 0, err
    rows = class_lines(out)
    assert sorted(c for c, _ in rows) == sorted(CLASSES)  # every class exactly once
    probs = [p for _, p in rows]
    assert abs(sum(probs) - 1) < 1e-3
    assert probs == sorted(probs, reverse=True)

    code, out, err = call(predict, [*FP32, image, "--weights", trained["best"], "--workers", "0", "--topk", "2"])
    assert code == 0, err
    assert len(class_lines(out)) == 2
    assert [c for c, _ in class_lines(out)] == [c for c, _ in rows[:2]]


def test_predict_folder_table_csv_and_json(trained, tmp_path):
    folder = trained["data"] / "val"
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    csv_path, json_path = tmp_path / "x.csv", tmp_path / "x.json"
    code, out, err = call(predict, [*FP32, folder, "--weights", trained["best"], "--workers", "0",
                                    "--output", csv_path])
    assert code == 0, err
    assert re.search(r"^file\s+class\s+probability", out, re.M)
    for f in files:
        assert f in out
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == files
    for r in rows:
        values = [float(r[c]) for c in CLASSES]
        assert abs(sum(values) - 1) < 1e-4
        assert r["class"] == CLASSES[max(range(3), key=values.__getitem__)]

    code, out, err = call(predict, [*FP32, folder, "--weights", trained["best"], "--workers", "0",
                                    "--output", json_path])
    assert code == 0, err
    records = json.loads(json_path.read_text())
    assert [r["file"] for r in records] == files
    for r in records:
        assert set(r["probabilities"]) == set(CLASSES)
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5


def test_predict_plain_state_dict_with_class_indices(trained, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "googleNet.pth"
    torch.save(GoogLeNet(num_classes=3, aux_logits=True).state_dict(), weights)  # the classic format
    image = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, out, err = call(predict, [*FP32, image, "--weights", weights, "--class-indices", trained["ci"],
                                    "--workers", "0"])
    assert code == 0, err
    rows = class_lines(out)
    assert sorted(c for c, _ in rows) == sorted(CLASSES)
    assert abs(sum(p for _, p in rows) - 1) < 1e-3


def test_predict_batches_give_the_same_probabilities(trained, tmp_path):
    images = sorted((trained["data"] / "val").rglob("*.jpg"))[:4]
    results = []
    for batch in (2, 4):
        path = tmp_path / f"b{batch}.json"
        code, _, err = call(predict, [*FP32, *images, "--weights", trained["best"], "--workers", "0",
                                      "--batch-size", batch, "--output", path])
        assert code == 0, err
        results.append(torch.tensor([[r["probabilities"][c] for c in CLASSES]
                                     for r in json.loads(path.read_text())]))
    assert results[0].shape == (4, 3)
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# bad input: one line "error: ...", a non-zero exit, never a traceback
# ---------------------------------------------------------------------------------------------
def test_cli_train_missing_data_path(tmp_path):
    """A folder of the user's that is missing: the error names both layouts, never a download into it."""
    missing = tmp_path / "nowhere"
    proc = run_script(TRAIN, train_argv(missing, tmp_path / "out"))
    line = assert_clean_error(proc.returncode, proc.stderr, str(missing), "does not exist", "--data-path",
                              "DIR/<class>/", "DIR/train/<class>/")
    assert "--download" not in line
    assert not (tmp_path / "out").exists()


def test_cli_train_missing_default_data_path(tmp_path):
    """From a folder without data_set/flower_data the hint is the download command."""
    proc = run_script(TRAIN, ["--output-dir", tmp_path / "out", "--class-indices", tmp_path / "ci.json"],
                      cwd=tmp_path)
    assert_clean_error(proc.returncode, proc.stderr, os.path.join("data_set", "flower_data"),
                       "python train.py --download")


def test_cli_predict_unreadable_images(trained, tmp_path):
    """A truncated JPEG and a text file among good images: the good ones are classified, the bad
    ones get an error line each, and the exit status says something failed (default workers)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(trained["data"] / "val" / "daisy" / "daisy_00.jpg", folder / "good.jpg")
    write_truncated_jpeg(folder / "half.jpg")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    proc = run_script(PREDICT, [*FP32, folder, notes, "--weights", trained["best"]])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(folder / "good.jpg") in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, proc.stderr
    assert any(str(folder / "half.jpg") in e for e in errors)
    assert any(str(notes) in e for e in errors)
    assert last_line(proc.stderr).startswith("error:")


def test_train_data_folder_without_classes(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    code, _, err = call(train, train_argv(tmp_path / "data", tmp_path / "out"))
    assert_clean_error(code, err, "has no class folders")


def test_train_class_folder_without_images(tmp_path):
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    empty = data_dir / "train" / "roses"
    shutil.rmtree(empty)
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, _, err = call(train, train_argv(data_dir, tmp_path / "out"))
    assert_clean_error(code, err, str(empty), "has no images")


def test_train_bad_images_error_names_the_file(tmp_path):
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    bad = write_corrupt(data_dir / "train" / "daisy" / "x.jpg")
    code, out, err = call(train, train_argv(data_dir, tmp_path / "out", "--bad-images", "error"))
    assert_clean_error(code, err, str(bad), "--bad-images skip")
    assert "train 1/" not in out


def test_train_skips_unreadable_images_by_default(tmp_path):
    """Random bytes are no image: the start-up check finds them. A truncated JPEG starts like one:
    it is found when first decoded, listed when that epoch ends, replaced in its batch by the next
    image in every epoch after, and recorded in last.pth; a truncated val image is left out."""
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    corrupt = write_corrupt(data_dir / "train" / "daisy" / "x.jpg")
    truncated = write_truncated_jpeg(data_dir / "train" / "roses" / "half.jpg")
    truncated_val = write_truncated_jpeg(data_dir / "val" / "tulips" / "half.jpg")
    code, out, err = call(train, train_argv(data_dir, tmp_path / "out", epochs=2))
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "skipped 1 unreadable" in skipped[0] and str(corrupt) in skipped[0], out
    assert "4 train, 4 val images" in out
    found = [line for line in out.splitlines() if "unreadable image(s) in epoch" in line]
    assert found == [f"found 2 unreadable image(s) in epoch 1, left out from now on: {truncated}; {truncated_val}"]
    assert load(tmp_path / "out" / "last.pth")["bad_images"] == [str(truncated), str(truncated_val)]
    assert (tmp_path / "out" / "best.pth").is_file()


def test_bad_images_error_stops_at_a_photo_that_fails_to_decode(tmp_path):
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    truncated = write_truncated_jpeg(data_dir / "train" / "roses" / "half.jpg")
    code, out, err = call(train, train_argv(data_dir, tmp_path / "out", "--bad-images", "error"))
    assert_clean_error(code, err, f"cannot read image {truncated}", "--bad-images skip")
    assert "train 1/" in out and not (tmp_path / "out" / "best.pth").exists()


def test_train_resume_missing_file(trained, tmp_path):
    missing = tmp_path / "gone" / "last.pth"
    code, _, err = call(train, train_argv(trained["data"], tmp_path / "out", "--resume", missing))
    assert_clean_error(code, err, str(missing), "does not exist")


def test_train_resume_from_weights_only_file(trained, tmp_path):
    weights = tmp_path / "plain.pth"
    torch.save(GoogLeNet(num_classes=3).state_dict(), weights)
    code, _, err = call(train, train_argv(trained["data"], tmp_path / "out", "--resume", weights))
    assert_clean_error(code, err, str(weights), "not a run to resume")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_train_device_cuda_without_gpu(trained, tmp_path):
    argv = train_argv(trained["data"], tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda"
    code, _, err = call(train, argv)
    assert_clean_error(code, err, "--device cuda", "--device cpu")


def test_train_unwritable_output_dir_fails_before_training(trained, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub"
    argv = train_argv(trained["data"], out)
    argv[argv.index("--class-indices") + 1] = str(tmp_path / "ci.json")
    code, stdout, err = call(train, argv)
    assert_clean_error(code, err, str(out), "--output-dir")
    assert "train 1/" not in stdout
    assert not (tmp_path / "ci.json").exists()


def test_train_unwritable_class_indices_fails_before_training(trained, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    argv = train_argv(trained["data"], tmp_path / "out")
    argv[argv.index("--class-indices") + 1] = str(blocker / "ci.json")
    code, stdout, err = call(train, argv)
    assert_clean_error(code, err, str(blocker / "ci.json"), "--class-indices")
    assert "train 1/" not in stdout


@pytest.fixture(scope="module")
def foreign_weights(tmp_path_factory):
    """Weights files predict.py must refuse, with a 3-class index file."""
    root = tmp_path_factory.mktemp("foreign")
    noise = write_corrupt(root / "noise.pth", n=5000)
    torch.manual_seed(0)
    five = root / "five.pth"
    torch.save(GoogLeNet(num_classes=5, aux_logits=True).state_dict(), five)
    from torchvision.models import resnet18

    resnet = root / "resnet18.pth"
    torch.save(resnet18().state_dict(), resnet)
    ci = root / "ci.json"
    ckpt.write_class_indices(ci, list(CLASSES))
    return {"noise": noise, "five": five, "resnet": resnet, "ci": ci}


def test_predict_missing_image(trained, tmp_path):
    missing = tmp_path / "nope.jpg"
    code, _, err = call(predict, [*FP32, missing, "--weights", trained["best"]])
    assert_clean_error(code, err, str(missing), "does not exist")


def test_predict_missing_weights(trained, tmp_path):
    image = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    missing = tmp_path / "nope.pth"
    code, _, err = call(predict, [*FP32, image, "--weights", missing])
    assert_clean_error(code, err, str(missing), "does not exist")


def test_eval_only_missing_weights_fails_before_decoding(trained, tmp_path):
    missing = tmp_path / "nope.pth"
    code, out, err = call(train, [*FP32, "--eval-only", "--weights", missing, "--data-path", trained["data"],
                                  "--output-dir", tmp_path / "eval"])
    assert_clean_error(code, err, str(missing), "does not exist")
    assert "cache:" not in out and "data:" not in out  # no image was decoded first


@pytest.mark.parametrize("make", ["text", "truncated"])
def test_predict_unreadable_image(trained, tmp_path, make):
    bad = tmp_path / "notes.txt" if make == "text" else tmp_path / "half.jpg"
    if make == "text":
        bad.write_text("not an image")
    else:
        write_truncated_jpeg(bad)
    code, out, err = call(predict, [*FP32, bad, "--weights", trained["best"], "--workers", "0"])
    assert_clean_error(code, err, str(bad), "cannot read image")
    assert class_lines(out) == []


def test_predict_weights_not_a_checkpoint(trained, foreign_weights):
    image = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", foreign_weights["noise"]])
    assert_clean_error(code, err, str(foreign_weights["noise"]), "not a readable PyTorch weights file")


def test_predict_weights_for_other_class_count(trained, foreign_weights):
    image = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", foreign_weights["five"], "--class-indices",
                                  foreign_weights["ci"]])
    assert_clean_error(code, err, "5 classes", str(foreign_weights["ci"]), "names 3")


def test_predict_weights_of_another_architecture(trained, foreign_weights):
    image = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", foreign_weights["resnet"], "--class-indices",
                                  foreign_weights["ci"]])
    line = assert_clean_error(code, err, str(foreign_weights["resnet"]), "missing keys", "unexpected keys")
    assert "conv1.conv.weight" in line or "inception" in line  # names GoogLeNet keys it lacks
    assert "layer1." in line or "bn1." in line  # and ResNet keys it does not know


def test_predict_output_with_bad_extension(trained, tmp_path):
    image = trained["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", trained["best"], "--output", tmp_path / "x.txt"])
    assert_clean_error(code, err, "x.txt", ".csv or .json")
    assert not (tmp_path / "x.txt").exists()


# ---------------------------------------------------------------------------------------------
# image modes
# ---------------------------------------------------------------------------------------------
def test_grayscale_palette_rgba_and_cmyk_images_train_and_predict(trained, tmp_path):
    root = tmp_path / "data"
    layout = {  # split/class: [(file name, mode)]
        ("train", "daisy"): [("gray.png", "L"), ("palette.png", "P")],
        ("train", "roses"): [("alpha.png", "RGBA"), ("cmyk.jpg", "CMYK")],
        ("train", "tulips"): [("gray.jpg", "L"), ("rgb.jpg", "RGB")],
        ("val", "daisy"): [("cmyk.jpg", "CMYK")],
        ("val", "roses"): [("palette.png", "P")],
        ("val", "tulips"): [("alpha.png", "RGBA")],
    }
    for (split, name), files in layout.items():
        for i, (file, mode) in enumerate(files):
            save_image(root / split / name / file, COLORS[CLASSES.index(name)], seed=i, mode=mode)
    code, out, err = call(train, train_argv(root, tmp_path / "out"))
    assert code == 0, err
    assert "skipped" not in out
    assert "6 train, 3 val images" in out

    images = [root / split / name / file for (split, name), files in layout.items() for file, _ in files]
    path = tmp_path / "modes.json"
    code, out, err = call(predict, [*FP32, *images, "--weights", trained["best"], "--workers", "0",
                                    "--output", path])
    assert code == 0, err
    records = json.loads(path.read_text())
    assert len(records) == len(images)
    for r in records:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5


# ---------------------------------------------------------------------------------------------
# resume, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch(trained, tmp_path_factory):
    """Run B's first half: --epochs 1 in one go (in-process); a copy of its last.pth stays."""
    root = tmp_path_factory.mktemp("resume")
    out = root / "B"
    assert call(train, train_argv(trained["data"], out, epochs=1))[0] == 0
    shutil.copy(out / "last.pth", root / "after_epoch_1.pth")
    return {"root": root, "B": out, "epoch1": root / "after_epoch_1.pth"}


def test_resume_between_epochs_is_bit_for_bit(trained, one_epoch):
    root = one_epoch["root"]
    code, _, err = call(train, train_argv(trained["data"], root / "A", epochs=2))
    assert code == 0, err
    B = one_epoch["B"]
    code, out, err = call(train, train_argv(trained["data"], B, "--resume", B / "last.pth", epochs=2))
    assert code == 0, err
    assert "resuming" in out and "[epoch 2]" in out and "[epoch 1]" not in out
    a, b = load(root / "A" / "last.pth"), load(B / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert_same_weights(a["model"], b["model"])
    with open(B / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_compiled_model_evaluates_like_the_eager_one(trained, tmp_path, monkeypatch):
    """--compile (torch.compile, meant for GPUs) builds the same function: --eval-only with and
    without it must count the same confusion matrix and the same loss on the val images."""
    compiled, real_compile = [], torch.compile

    def recording_compile(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        argv = [*FP32, "--eval-only", "--weights", trained["best"], "--data-path", trained["data"], "--output-dir",
                tmp_path / name, "--device", "cpu", "--workers", "0", *extra]
        code, out, err = call(train, argv)
        assert code == 0, err
        reports[name] = ((tmp_path / name / "confusion_matrix.csv").read_text(),
                         float(re.search(r"loss: ([\d.]+)", out).group(1)))
    assert compiled == ["GoogLeNet"]  # by the --compile run only
    assert reports["compiled"][0] == reports["eager"][0]
    assert reports["compiled"][1] == pytest.approx(reports["eager"][1], abs=2e-4)  # printed to 4 places


def test_fp16_loss_scaling_trains_like_the_plain_run(trained, one_epoch, tmp_path, monkeypatch):
    """CUDA's fp16 path scales the loss, unscales the gradients inside the fused optimizer step and
    adapts the scale. Here that GradScaler runs on the CPU in fp32: scaling by a power of two is
    exact, so the epoch must end on the same weights as the plain run, bit for bit."""
    from plumbing import device as dev

    scalers = []

    def enabled_scaler(device, dtype):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(dev, "grad_scaler", enabled_scaler)
    out = tmp_path / "scaled"
    code, _, err = call(train, train_argv(trained["data"], out, epochs=1))
    assert code == 0, err
    assert len(scalers) == 1 and scalers[0].is_enabled()
    assert scalers[0].get_scale() == 2.0 ** 15  # grown after each of the 3 steps: no inf was found
    last = load(out / "last.pth")
    assert last["scaler"]["scale"] == 2.0 ** 15  # and saved for --resume
    assert_same_weights(last["model"], load(one_epoch["epoch1"])["model"])


# ---------------------------------------------------------------------------------------------
# SIGINT and SIGTERM
# ---------------------------------------------------------------------------------------------
class Reader(threading.Thread):
    """Collects a pipe's output without blocking the test."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.chunks = pipe, []
        self.start()

    def run(self):
        for chunk in iter(lambda: self.pipe.read1(4096), b""):
            self.chunks.append(chunk)

    def text(self):
        return b"".join(self.chunks).decode(errors="replace")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_prints_the_resume_command(trained, tmp_path, monkeypatch, signum):
    out = tmp_path / "out dir"  # a space: the printed command must quote it
    argv = train_argv(trained["data"], out, epochs=1 if signum == signal.SIGINT else 2)
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = Reader(proc.stdout), Reader(proc.stderr)
    try:
        deadline = time.monotonic() + 300
        while "train 1/" not in stdout.text():  # the handlers are in place once the first bar shows
            assert proc.poll() is None, stdout.text() + stderr.text()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        proc.send_signal(signum)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout.join(10)
    stderr.join(10)
    text, err = stdout.text(), stderr.text()
    assert code == 128 + signum, text[-2000:] + err[-2000:]
    assert "Traceback" not in err
    assert f"{signal.Signals(signum).name}: stopped at epoch 1, step " in text
    lines = text.splitlines()
    command = lines[[i for i, line in enumerate(lines) if "Resume with:" in line][-1] + 1].strip()
    assert command.startswith("python train.py --resume ")
    words = shlex.split(command)
    assert words[3] == str(out / "last.pth")
    last = load(out / "last.pth")
    assert last["epoch"] == 0 and last["step"] >= 1 and "optimizer" in last

    if signum == signal.SIGINT:  # the printed command finishes the run (in-process: same argv, same cwd)
        monkeypatch.chdir(REPO)
        code, text, err = call(train, words[2:])
        assert code == 0, err
        assert "resuming" in text
        final = load(out / "last.pth")
        assert final["epoch"] == 1 and final["step"] == 0
        assert (out / "best.pth").is_file()


# ---------------------------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_train,where", [(4, r"at epoch 1, step \d+"), (1, r"after epoch 1")],
                         ids=["in-a-step", "after-the-last-step"])
def test_nan_stops_and_keeps_best(trained, tmp_path, n_train, where):
    """lr 1e12 blows the weights up after one Adam step: with 4 images per class the next step's
    loss is NaN; with one image per class (one step per epoch) the validation loss is."""
    data_dir = trained["data"] if n_train == 4 else make_tree(tmp_path / "data", n_train=1, n_val=1)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained["best"], out / "best.pth")
    before = (out / "best.pth").read_bytes()
    code, _, err = call(train, train_argv(data_dir, out, "--lr", "1e12", "--overwrite", epochs=2))
    line = assert_clean_error(code, err, "diverged", "--lr")
    assert re.search(where, line), line
    assert (out / "best.pth").read_bytes() == before
    if n_train == 4:  # diverged in the first epoch: nothing was saved
        assert not (out / "last.pth").exists()


# ---------------------------------------------------------------------------------------------
# download (offline: a local archive served over HTTP on 127.0.0.1)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    photos = root / "src" / "flower_photos"
    for k, name in enumerate(("daisy", "tulips")):
        for i in range(5):
            save_image(photos / name / f"{i:03d}.jpg", COLORS[k], seed=k * 100 + i)
    (photos / "LICENSE.txt").write_text("credits")
    tgz = root / "serve" / "flower_photos.tgz"
    tgz.parent.mkdir()
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(photos, arcname="flower_photos")
    return {"tgz": tgz, "sha256": hashlib.sha256(tgz.read_bytes()).hexdigest()}


@pytest.fixture
def server(archive):
    """http://127.0.0.1:<port>/flower_photos.tgz, served from a thread."""
    folder = str(archive["tgz"].parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/flower_photos.tgz"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def test_download_flowers_over_http(archive, server, tmp_path):
    dest = tmp_path / "flower_data"
    photos = download.download_flowers(str(dest), url=server, sha256=archive["sha256"], log=lambda *a: None)
    assert photos == str(dest / "flower_photos")
    assert sorted(os.listdir(photos)) == ["LICENSE.txt", "daisy", "tulips"]
    assert len(os.listdir(os.path.join(photos, "daisy"))) == 5
    assert not [f for f in os.listdir(dest) if f.endswith(".part")]


def test_download_with_wrong_sha256_leaves_nothing(archive, server, tmp_path):
    dest = tmp_path / "flower_data"
    with pytest.raises(data.DataError, match="SHA-256"):
        download.download_flowers(str(dest), url=server, sha256="0" * 64, log=lambda *a: None)
    assert os.listdir(dest) == []  # neither the archive nor a .part file


def test_train_download_splits_and_trains(archive, tmp_path):
    data_dir = tmp_path / "flower_data"
    out = tmp_path / "out"
    argv = ["--download", "--data-url", archive["tgz"], "--data-sha256", archive["sha256"],
            *train_argv(data_dir, out)]
    code, stdout, err = call(train, argv)
    assert code == 0, err
    for split, n in (("train", 4), ("val", 1)):
        for name in ("daisy", "tulips"):
            assert len(os.listdir(data_dir / split / name)) == n
    assert "8 train, 2 val images" in stdout
    assert load(out / "best.pth")["classes"] == ["daisy", "tulips"]
