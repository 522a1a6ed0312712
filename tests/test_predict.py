"""predict.py with .pth weights (the session's small run): one photo, folders to a table, .csv and
.json, a plain state dict with its class index file, batches, the evaluation sizes the weights
record, TTA; and every mistake (a missing or unreadable photo, weights that are not a checkpoint or
for another model, an output it cannot write) as one line. Big folders, resuming a .csv and
--sort-into: test_predict_folders.py; .onnx files: test_export.py."""
import csv
import json
import re
import shutil

import pytest
import torch

import predict
from helpers import (
    CLASSES,
    FP32,
    assert_clean_error,
    call,
    class_lines,
    last_line,
    write_corrupt,
    write_truncated_jpeg,
)
from inference import checkpoint as ckpt
from inference import classify, images
from model import GoogLeNet
from training import data

CPU = torch.device("cpu")


def test_one_image_prints_every_class(small_run):
    image = small_run["data"] / "val" / "roses" / "roses_00.jpg"
    code, out, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--workers", "0"])
    assert code == 0, err
    rows = class_lines(out)
    assert sorted(c for c, _ in rows) == sorted(CLASSES)  # every class exactly once
    probs = [p for _, p in rows]
    assert abs(sum(probs) - 1) < 1e-3
    assert probs == sorted(probs, reverse=True)

    code, out, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--workers", "0", "--topk", "2"])
    assert code == 0, err
    assert [c for c, _ in class_lines(out)] == [c for c, _ in rows[:2]]


def test_a_folder_gives_a_table_a_csv_and_a_json(small_run, tmp_path):
    folder = small_run["data"] / "val"
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    csv_path, json_path = tmp_path / "x.csv", tmp_path / "x.json"
    code, out, err = call(predict, [*FP32, folder, "--weights", small_run["best"], "--workers", "0",
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

    code, out, err = call(predict, [*FP32, folder, "--weights", small_run["best"], "--workers", "0",
                                    "--output", json_path])
    assert code == 0, err
    records = json.loads(json_path.read_text())
    assert [r["file"] for r in records] == files
    for r, row in zip(records, rows):
        assert set(r["probabilities"]) == set(CLASSES) and r["class"] == row["class"]
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5


def test_a_plain_state_dict_with_a_class_index_file(small_run, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "googleNet.pth"
    torch.save(GoogLeNet(num_classes=3, aux_logits=True).state_dict(), weights)  # the classic format
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, out, err = call(predict, [*FP32, image, "--weights", weights, "--class-indices", small_run["ci"],
                                    "--workers", "0"])
    assert code == 0, err
    rows = class_lines(out)
    assert sorted(c for c, _ in rows) == sorted(CLASSES)
    assert abs(sum(p for _, p in rows) - 1) < 1e-3


def test_batches_give_the_same_probabilities(small_run, tmp_path):
    photos = sorted((small_run["data"] / "val").rglob("*.jpg"))[:4]
    results = []
    for batch in (2, 4):
        path = tmp_path / f"b{batch}.json"
        code, _, err = call(predict, [*FP32, *photos, "--weights", small_run["best"], "--workers", "0",
                                      "--batch-size", batch, "--output", path])
        assert code == 0, err
        results.append(torch.tensor([[r["probabilities"][c] for c in CLASSES]
                                     for r in json.loads(path.read_text())]))
    assert results[0].shape == (4, 3)
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)


def test_the_weights_evaluation_sizes_are_used(small_run):
    """The run recorded evaluation at 60 px from images resized to 64: prediction computes what the
    model gives on exactly that preprocessing."""
    model, _, preprocessing = ckpt.load_model(str(small_run["best"]), "unused.json", CPU)
    assert preprocessing == images.Preprocessing(64, 60, images.MEAN, images.STD)
    image = small_run["data"] / "val" / "roses" / "roses_00.jpg"
    classifier = classify.load_classifier(str(small_run["best"]), device="cpu", amp="off")
    got, errors = classify.predict(classifier, [str(image)], 1, 0)
    assert errors == [""]
    x = data.normalize_batch(data.EvalTransform(preprocessing)(images.load_image(str(image)))[None], channels_last=True)
    with torch.inference_mode():
        expected = torch.softmax(model(x), 1)
    torch.testing.assert_close(torch.from_numpy(got), expected)


def test_tta_averages_the_photo_and_its_mirror(small_run):
    image = small_run["data"] / "val" / "tulips" / "tulips_01.jpg"
    model, classes, preprocessing = ckpt.load_model(str(small_run["best"]), "unused.json", CPU)
    x = data.normalize_batch(data.EvalTransform(preprocessing)(images.load_image(str(image)))[None], channels_last=True)
    with torch.inference_mode():
        expected = torch.softmax((model(x) + model(x.flip(3))) / 2, 1)
    code, stdout, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--tta"])
    assert code == 0, err
    printed = dict(class_lines(stdout))
    for k, name in enumerate(classes):
        assert printed[name] == pytest.approx(expected[0, k].item(), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# mistakes: one line "error: ...", a non-zero exit, never a traceback
# ---------------------------------------------------------------------------------------------
def test_unreadable_photos_among_good_ones_are_listed_and_the_exit_says_so(small_run, tmp_path):
    """A truncated JPEG and a text file among good photos: the good ones are classified, the bad
    ones get an error line each, and the exit status says something failed (default workers)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(small_run["data"] / "val" / "daisy" / "daisy_00.jpg", folder / "good.jpg")
    write_truncated_jpeg(folder / "half.jpg")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    code, out, err = call(predict, [*FP32, folder, notes, "--weights", small_run["best"]])
    assert code == 1
    assert str(folder / "good.jpg") in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, err
    assert any(str(folder / "half.jpg") in e for e in errors)
    assert any(str(notes) in e for e in errors)
    assert last_line(err).startswith("error:")


@pytest.mark.parametrize("make", ["text", "truncated"])
def test_one_unreadable_photo_is_one_line(small_run, tmp_path, make):
    bad = tmp_path / "notes.txt" if make == "text" else tmp_path / "half.jpg"
    if make == "text":
        bad.write_text("not an image")
    else:
        write_truncated_jpeg(bad)
    code, out, err = call(predict, [*FP32, bad, "--weights", small_run["best"], "--workers", "0"])
    assert_clean_error(code, err, str(bad), "cannot read image")
    assert class_lines(out) == []


def test_a_missing_photo_or_weights_file_is_one_line(small_run, tmp_path):
    missing = tmp_path / "nope.jpg"
    code, _, err = call(predict, [*FP32, missing, "--weights", small_run["best"]])
    assert_clean_error(code, err, str(missing), "does not exist")
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    missing = tmp_path / "nope.pth"
    code, _, err = call(predict, [*FP32, image, "--weights", missing])
    assert_clean_error(code, err, str(missing), "does not exist")


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


def test_weights_that_are_not_a_checkpoint(small_run, foreign_weights):
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", foreign_weights["noise"]])
    assert_clean_error(code, err, str(foreign_weights["noise"]), "not a readable PyTorch weights file")


def test_weights_for_another_class_count(small_run, foreign_weights):
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", foreign_weights["five"], "--class-indices",
                                  foreign_weights["ci"]])
    assert_clean_error(code, err, "5 classes", str(foreign_weights["ci"]), "names 3")


def test_weights_of_another_architecture(small_run, foreign_weights):
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", foreign_weights["resnet"], "--class-indices",
                                  foreign_weights["ci"]])
    line = assert_clean_error(code, err, str(foreign_weights["resnet"]), "missing keys", "unexpected keys")
    assert "conv1.conv.weight" in line or "inception" in line  # names GoogLeNet keys it lacks
    assert "layer1." in line or "bn1." in line  # and ResNet keys it does not know


def test_an_output_with_another_extension_is_refused(small_run, tmp_path):
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--output", tmp_path / "x.txt"])
    assert_clean_error(code, err, "x.txt", ".csv or .json")
    assert not (tmp_path / "x.txt").exists()
