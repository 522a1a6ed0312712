"""The data layouts train.py takes (training/data.py's find_data): a plain folder of class folders,
split at start and recorded in the checkpoints, or a train/ and val/ tree; links followed but entered
once; and a folder that is neither, empty, missing or inconsistent refused with one line that says
what was found and what to do."""
import os
import re
import shutil
import signal

import pytest

import train
from helpers import (
    COLORS,
    TRAIN,
    assert_clean_error,
    call,
    eval_argv,
    load,
    make_tree,
    run_script,
    save_image,
    stop_after_step,
    train_argv,
)
from inference import classify
from plumbing import stopping
from training import data
from training.data import split_dataset


def plain_folder(root, counts=(6, 5, 4)):
    """root/<class>/<images> with no train/ or val/, as flower_photos is."""
    for k, (name, n) in enumerate(zip(("daisy", "roses", "tulips"), counts)):
        for i in range(n):
            save_image(root / name / f"{name}_{i:02d}.jpg", COLORS[k], seed=k * 100 + i)
    (root / "LICENSE.txt").write_text("credits")  # a file beside the class folders is ignored
    return root


# ---------------------------------------------------------------------------------------------
# a plain folder of class folders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    photos = plain_folder(root / "photos")
    out = root / "out"
    code, stdout, err = call(train, train_argv(photos, out, "--image-size", 48, "--val-ratio", 0.25))
    assert code == 0, err
    return {"root": root, "photos": photos, "out": out, "stdout": stdout}


def test_plain_folder_holds_out_split_data_pys_split(plain_run, tmp_path):
    split_dataset(str(plain_run["photos"]), str(tmp_path / "split"), val_ratio=0.25, seed=0, log=lambda *a: None)
    expected = sorted(f"{c}/{f}" for c in ("daisy", "roses", "tulips")
                      for f in os.listdir(tmp_path / "split" / "val" / c))
    recorded = load(plain_run["out"] / "best.pth")["split"]
    assert recorded["val_ratio"] == 0.25 and recorded["seed"] == 0
    assert sorted(recorded["val_files"]) == expected
    assert len(expected) == 1 + 1 + 1  # int(6/4), int(5/4), int(4/4): one of each class


def test_plain_folder_prints_the_counts_per_class(plain_run):
    assert "daisy 5/1, roses 4/1, tulips 3/1 (train/val)" in plain_run["stdout"]
    assert "12 train, 3 val images" in plain_run["stdout"]


def test_resume_and_eval_only_use_the_recorded_val_images(plain_run, tmp_path, monkeypatch):
    """Photos added to the folder after the run started never move into its val set."""
    photos = tmp_path / "photos"
    shutil.copytree(plain_run["photos"], photos)
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # stopped in epoch 2 of 2 (3 steps an epoch)
        m.setattr(stopping.StopRequest, "check", stop_after_step(4, out, tmp_path / "after_epoch_1.pth"))
        code, _, err = call(train, train_argv(photos, out, "--image-size", 48, "--val-ratio", 0.25, epochs=2))
    assert code == 128 + signal.SIGTERM, err
    recorded = load(out / "last.pth")["split"]["val_files"]
    for i in range(4):  # new photos that a fresh split would share out differently
        save_image(photos / "tulips" / f"a_new_{i}.jpg", COLORS[2], seed=900 + i)
    code, stdout, err = call(train, ["--resume", out / "last.pth"])
    assert code == 0, err
    assert "16 train, 3 val images" in stdout  # the 4 new photos train; val is the recorded 3
    assert load(out / "last.pth")["split"]["val_files"] == recorded
    code, stdout, err = call(train, eval_argv(out / "best.pth", photos, tmp_path / "ev"))
    assert code == 0, err
    assert "accuracy:" in stdout and "/3)" in stdout  # n correct / 3 val images
    os.remove(photos / recorded[0])  # no longer the run's folder as it was: scored whole, with a warning
    code, stdout, err = call(train, eval_argv(out / "best.pth", photos, tmp_path / "ev"))
    assert code == 0, err
    assert "note:" in stdout and "holds 2 of the 3 val images" in stdout and "too high" in stdout


# ---------------------------------------------------------------------------------------------
# folders that are not data
# ---------------------------------------------------------------------------------------------
def test_a_missing_data_folder_names_both_layouts(tmp_path):
    """From the command line (a process of its own: the exit status and the one line as a user sees
    them): a folder of the user's that is missing is never downloaded into."""
    missing = tmp_path / "nowhere"
    proc = run_script(TRAIN, train_argv(missing, tmp_path / "out"))
    line = assert_clean_error(proc.returncode, proc.stderr, str(missing), "does not exist", "--data-path",
                              "DIR/<class>/", "DIR/train/<class>/")
    assert proc.returncode == 2 and "--download" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.quick
def test_a_missing_default_data_folder_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder without data_set/flower_data
    code, _, err = call(train, ["--output-dir", tmp_path / "out", "--class-indices", tmp_path / "ci.json"])
    assert_clean_error(code, err, os.path.join("data_set", "flower_data"), "python train.py --download")


@pytest.mark.quick
def test_a_folder_that_is_neither_layout_says_what_it_found(tmp_path):
    loose = tmp_path / "loose"
    for i in range(3):
        save_image(loose / f"{i}.jpg", COLORS[0], seed=i)
    code, _, err = call(train, train_argv(loose, tmp_path / "out"))
    line = assert_clean_error(code, err, str(loose), "3 file(s) and no folders", "DIR/<class>/<images>",
                              "DIR/train/<class>/")
    assert "--download" not in line


@pytest.mark.quick
def test_one_class_folder_points_at_the_folder_inside(tmp_path):
    outer = tmp_path / "outer"
    plain_folder(outer / "flower_photos")
    code, _, err = call(train, train_argv(outer, tmp_path / "out"))
    assert_clean_error(code, err, "one class folder (flower_photos)", str(outer / "flower_photos"))


@pytest.mark.quick
@pytest.mark.parametrize("layout", ["plain", "split"])
@pytest.mark.parametrize("name", ["unknown", "Unknown"])
def test_a_class_folder_named_like_the_not_sure_answer_is_refused(tmp_path, layout, name):
    """A class "unknown" would be trained, and predictions.csv, the page and --sort-into (whose folders
    may ignore case) could not tell it from their "unknown" answer for a photo the model is not sure of."""
    root = tmp_path / "data"
    if layout == "plain":
        plain_folder(root)
        save_image(root / name / "0.jpg", COLORS[3])
        save_image(root / name / "1.jpg", COLORS[3], seed=1)
    else:
        make_tree(root, classes=("daisy", "roses", name), n_train=1, n_val=1)
    code, out, err = call(train, train_argv(root, tmp_path / "out"))
    assert_clean_error(code, err, f"class folder {name}", '"unknown"', "rename")
    assert "train 1/" not in out


@pytest.mark.quick
def test_a_split_without_class_folders_is_one_line(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    code, _, err = call(train, train_argv(tmp_path / "data", tmp_path / "out"))
    assert_clean_error(code, err, "has no class folders")


@pytest.mark.quick
def test_a_class_folder_without_images_is_one_line(tmp_path):
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    empty = data_dir / "train" / "roses"
    shutil.rmtree(empty)
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, _, err = call(train, train_argv(data_dir, tmp_path / "out"))
    assert_clean_error(code, err, str(empty), "has no images")


@pytest.mark.quick
@pytest.mark.parametrize("side", ["val", "train"])
def test_a_split_whose_train_and_val_classes_differ_is_refused(side, tmp_path):
    tree = make_tree(tmp_path / "data", n_train=1, n_val=1)
    save_image(tree / side / "lilies" / "0.jpg", COLORS[3])
    code, _, err = call(train, train_argv(tree, tmp_path / "out"))
    other = "train" if side == "val" else "val"
    line = assert_clean_error(code, err, "class lilies", str(tree / side), f"none in {tree / other}")
    assert re.search("never|would never", line)


@pytest.mark.quick
def test_a_link_to_a_parent_folder_is_entered_once(tmp_path):
    root = tmp_path / "photos"
    for k, name in enumerate(("daisy", "roses")):
        for i in range(4):
            save_image(root / name / f"{i}.jpg", COLORS[k], seed=i)
    os.symlink("..", root / "daisy" / "loop")  # daisy/loop/daisy/loop/... would never end
    other = tmp_path / "more_roses"
    save_image(other / "extra.jpg", COLORS[1])
    os.symlink(other, root / "roses" / "linked")  # a link to a folder of photos is followed
    samples = data.list_images(str(root), ["daisy", "roses"])
    names = [(os.path.relpath(p, root), k) for p, k in samples]
    assert len(samples) == 9 and sum(k == 0 for _, k in samples) == 4, names
    assert (os.path.join("roses", "linked", "extra.jpg"), 1) in names
    assert len(classify.collect_images([str(root)])) == 9
