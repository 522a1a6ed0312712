"""train.py --eval-only on any test set: every image of a folder of class folders (or of its val/
folder) is scored, the classes matched by name with the weights'; the folder the weights were
trained on is scored on its recorded val images only.

One tiny 3-class model is trained for the module on a plain folder (12 photos per class, 7 held out:
21 val photos, enough for the temperature that predict.py and --eval-only both apply)."""
import csv
import re
import shutil

import pytest

import predict
import train
from helpers import COLORS, FP32, assert_clean_error, call, load, save_image, train_argv
from inference import classify

CLASSES = ["daisy", "roses", "tulips"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_any")
    photos = root / "photos"
    for k, name in enumerate(CLASSES):
        for i in range(12):
            save_image(photos / name / f"{name}_{i:02d}.jpg", COLORS[k], seed=k * 1000 + i, size=(48, 48))
    out = root / "out"
    code, _, err = call(train, train_argv(photos, out, "--image-size", 32, "--val-ratio", 0.6))
    assert code == 0, err
    best = load(out / "best.pth")
    assert "temperature" in best
    return {"root": root, "photos": photos, "best": out / "best.pth", "val_files": best["split"]["val_files"]}


def evaluate(run, folder, out):
    return call(train, [*FP32, "--eval-only", "--weights", run["best"], "--data-path", folder, "--output-dir", out,
                        "--device", "cpu", "--workers", 0, "--batch-size", 4])


def scored(stdout):
    """(right, images) of the report's accuracy line."""
    (match,) = re.findall(r"accuracy: \d\.\d{4} \((\d+)/(\d+)\)", stdout)
    return int(match[0]), int(match[1])


def predictions(out):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_test_folder_with_two_of_the_three_classes_is_scored_whole_by_class_name(run, tmp_path):
    test = tmp_path / "test"
    # tulips and daisy only: in the folder's own order they would be classes 0 and 1
    files = [save_image(test / "tulips" / f"t{i}.png", COLORS[2], seed=7000 + i, size=(48, 48)) for i in range(3)]
    files += [save_image(test / "daisy" / f"d{i}.png", COLORS[0], seed=8000 + i, size=(48, 48)) for i in range(4)]
    code, stdout, err = evaluate(run, test, tmp_path / "ev")
    assert code == 0, err
    assert scored(stdout)[1] == 7  # every image, none held out
    assert "daisy 4, tulips 3; no folder for roses" in stdout
    assert "no images of roses were scored" in stdout
    rows = predictions(tmp_path / "ev")
    assert list(rows[0])[4:] == [f"p_{c}" for c in CLASSES]  # the weights' classes, in their order
    assert sorted(r["file"] for r in rows) == sorted(map(str, files))
    assert all(r["true_class"] == r["file"].split("/")[-2] for r in rows)
    # the probability of each class is the one predict.py gives that class, by name
    classifier = classify.load_classifier(str(run["best"]), device="cpu", amp="off")
    expected, _ = classify.predict(classifier, [r["file"] for r in rows], 4, 0)
    for row, p in zip(rows, expected):
        assert [float(row[f"p_{c}"]) for c in CLASSES] == pytest.approx(p.tolist(), abs=1e-5)
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["class", "precision", "recall", "accuracy",
                                                                          "images"])
    support = {line.split()[0]: line.split()[-1] for line in lines[header + 1: header + 4]}
    assert support == {"daisy": "4", "roses": "0", "tulips": "3"}
    assert "accuracy against coverage" in stdout and "ECE" in stdout


def test_a_class_folder_the_weights_do_not_know_is_one_error(run, tmp_path):
    test = tmp_path / "test"
    save_image(test / "daisy" / "d.png", COLORS[0], seed=1, size=(48, 48))
    save_image(test / "lilies" / "l.png", COLORS[3], seed=2, size=(48, 48))
    code, _, err = evaluate(run, test, tmp_path / "ev")
    assert_clean_error(code, err, "lilies", "the weights do not know", "daisy, roses, tulips")


def test_the_folder_the_weights_were_trained_on_is_scored_on_its_val_images(run, tmp_path):
    code, stdout, err = evaluate(run, run["photos"], tmp_path / "ev")
    assert code == 0, err
    assert scored(stdout)[1] == len(run["val_files"]) == 21
    assert "is the folder these weights were trained on: scoring only its 21 val images" in stdout
    assert sorted(r["file"] for r in predictions(tmp_path / "ev")) == sorted(
        str(run["photos"] / f) for f in run["val_files"])
    # a copy that lacks one of them is a test set like any other: every image, and a note
    copy = tmp_path / "copy"
    shutil.copytree(run["photos"], copy)
    (copy / run["val_files"][0]).unlink()
    code, stdout, err = evaluate(run, copy, tmp_path / "ev2")
    assert code == 0, err
    assert scored(stdout)[1] == 35
    assert "holds 20 of the 21 val images these weights were validated on" in stdout


def test_a_split_tree_is_scored_on_its_val_folder(run, tmp_path):
    test = tmp_path / "split"
    save_image(test / "train" / "roses" / "r.png", COLORS[1], seed=3, size=(48, 48))
    for i in range(2):
        save_image(test / "val" / "roses" / f"r{i}.png", COLORS[1], seed=10 + i, size=(48, 48))
    code, stdout, err = evaluate(run, test, tmp_path / "ev")
    assert code == 0, err
    assert scored(stdout)[1] == 2 and "no folder for daisy, tulips" in stdout
    assert {r["true_class"] for r in predictions(tmp_path / "ev")} == {"roses"}


def test_predict_and_eval_only_agree_on_a_photo(run, tmp_path):
    """The CSV of predict.py and predictions.csv carry the same calibrated probabilities."""
    test = tmp_path / "test"
    photo = save_image(test / "roses" / "r.png", COLORS[1], seed=99, size=(48, 48))
    code, _, err = evaluate(run, test, tmp_path / "ev")
    assert code == 0, err
    (row,) = predictions(tmp_path / "ev")
    code, _, err = call(predict, [*FP32, photo, "--weights", run["best"], "--output", tmp_path / "p.csv",
                                  "--min-confidence", 0])
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as f:
        (mine,) = list(csv.DictReader(f))
    assert [float(mine[c]) for c in CLASSES] == pytest.approx([float(row[f"p_{c}"]) for c in CLASSES], abs=1e-5)
