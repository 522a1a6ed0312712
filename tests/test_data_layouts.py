"""A plain folder of class folders as training data, and photos read upright (EXIF orientation)."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train
from helpers import COLORS, FP32, assert_clean_error, call, dataset_of, load, save_image, train_argv
from inference import classify, images
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
    assert call(train, train_argv(photos, out, "--image-size", 64, "--val-ratio", 0.25))[0] == 0
    return {"root": root, "photos": photos, "out": out}


def test_plain_folder_holds_out_split_data_pys_split(plain_run, tmp_path):
    split_dataset(str(plain_run["photos"]), str(tmp_path / "split"), val_ratio=0.25, seed=0, log=lambda *a: None)
    expected = sorted(f"{c}/{f}" for c in ("daisy", "roses", "tulips")
                      for f in os.listdir(tmp_path / "split" / "val" / c))
    recorded = load(plain_run["out"] / "best.pth")["split"]
    assert recorded["val_ratio"] == 0.25 and recorded["seed"] == 0
    assert sorted(recorded["val_files"]) == expected
    assert len(expected) == 1 + 1 + 1  # int(6/4), int(5/4), int(4/4): one of each class


def test_plain_folder_prints_the_counts_per_class(plain_run, tmp_path):
    code, out, err = call(train, train_argv(plain_run["photos"], tmp_path / "o", "--image-size", 64,
                                            "--val-ratio", 0.25))
    assert code == 0, err
    assert "daisy 5/1, roses 4/1, tulips 3/1 (train/val)" in out
    assert "12 train, 3 val images" in out


def test_resume_and_eval_only_use_the_recorded_val_images(plain_run, tmp_path):
    """Photos added to the folder after the run started never move into its val set."""
    photos = tmp_path / "photos"
    shutil.copytree(plain_run["photos"], photos)
    out = tmp_path / "out"
    argv = train_argv(photos, out, "--image-size", 64, "--val-ratio", 0.25)
    assert call(train, argv)[0] == 0
    recorded = load(out / "last.pth")["split"]["val_files"]
    for i in range(4):  # new photos that a fresh split would share out differently
        save_image(photos / "tulips" / f"a_new_{i}.jpg", COLORS[2], seed=900 + i)
    code, stdout, err = call(train, argv + ["--epochs", 2, "--resume", out / "last.pth"])
    assert code == 0, err
    assert "16 train, 3 val images" in stdout  # the 4 new photos train; val is the recorded 3
    assert load(out / "last.pth")["split"]["val_files"] == recorded
    code, stdout, err = call(train, [*FP32, "--eval-only", "--weights", out / "best.pth", "--data-path", photos,
                                     "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert code == 0, err
    assert "accuracy:" in stdout and "/3)" in stdout  # n correct / 3 val images
    os.remove(photos / recorded[0])
    code, _, err = call(train, [*FP32, "--eval-only", "--weights", out / "best.pth", "--data-path", photos,
                                "--output-dir", tmp_path / "ev", "--device", "cpu"])
    assert_clean_error(code, err, "no longer holds the run's val images", recorded[0].split("/")[-1])


def test_a_split_tree_still_works_as_before(tmp_path):
    split_dataset(str(plain_folder(tmp_path / "photos")), str(tmp_path / "split"), log=lambda *a: None)
    code, out, err = call(train, train_argv(tmp_path / "split", tmp_path / "out", "--image-size", 64))
    assert code == 0, err
    assert "split:" not in out and "12 train, 3 val images" in out
    assert load(tmp_path / "out" / "best.pth")["split"] is None


def test_a_folder_that_is_neither_layout_says_what_it_found(tmp_path):
    loose = tmp_path / "loose"
    for i in range(3):
        save_image(loose / f"{i}.jpg", COLORS[0], seed=i)
    code, _, err = call(train, train_argv(loose, tmp_path / "out"))
    line = assert_clean_error(code, err, str(loose), "3 file(s) and no folders", "DIR/<class>/<images>",
                              "DIR/train/<class>/")
    assert "--download" not in line


def test_one_class_folder_points_at_the_folder_inside(tmp_path):
    outer = tmp_path / "outer"
    plain_folder(outer / "flower_photos")
    code, _, err = call(train, train_argv(outer, tmp_path / "out"))
    assert_clean_error(code, err, "one class folder (flower_photos)", str(outer / "flower_photos"))


def test_split_seed_changes_the_held_out_images(plain_run):
    samples = data.list_images(str(plain_run["photos"]), ["daisy", "roses", "tulips"])
    _, a = data.split_samples(samples, ["daisy", "roses", "tulips"], 0.5, seed=0)
    _, b = data.split_samples(samples, ["daisy", "roses", "tulips"], 0.5, seed=1)
    assert [k for _, k in a] == [k for _, k in b]  # the same counts per class
    assert a != b


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------
def sideways_photo(path, size=(60, 40)):
    """An upright picture (red top half, blue bottom half) stored rotated by 90 degrees, with the
    EXIF orientation 6 ("rotate 90 clockwise to view") that a phone writes for it."""
    w, h = size
    upright = np.zeros((h, w, 3), np.uint8)
    upright[: h // 2] = (255, 0, 0)
    upright[h // 2:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # h wide, w high
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif, quality=95)
    return path


def assert_upright(image, size):
    pixels = np.asarray(image).astype(int)
    assert image.size == size
    h = size[1]
    assert pixels[: h // 4, :, 0].mean() > 200 and pixels[: h // 4, :, 2].mean() < 50  # red on top
    assert pixels[-h // 4:, :, 2].mean() > 200 and pixels[-h // 4:, :, 0].mean() < 50  # blue below


def test_a_sideways_photo_is_read_upright(tmp_path):
    path = sideways_photo(tmp_path / "phone.jpg")
    with Image.open(path) as raw:
        assert raw.size == (40, 60)  # as stored
    assert_upright(images.load_image(str(path)), (60, 40))


def test_upright_with_draft_decoding_of_a_large_photo(tmp_path):
    path = sideways_photo(tmp_path / "big.jpg", size=(3000, 2000))
    image = images.load_image(str(path))
    assert_upright(image, (1500, 1000))  # halved by the JPEG draft, then turned
    assert min(image.size) >= images.DECODE_MIN_SIDE


def test_cache_stream_and_prediction_all_see_it_upright(tmp_path):
    path = sideways_photo(tmp_path / "photos" / "a" / "phone.jpg", size=(96, 64))
    preprocessing = images.Preprocessing(64, 64)
    transform = data.EvalTransform(preprocessing)
    cached = dataset_of(tmp_path / "photos", transform, cached=True)
    streamed = dataset_of(tmp_path / "photos", transform, cached=False)
    assert torch.equal(cached[0][0], streamed[0][0])
    assert_upright(Image.fromarray(cached.cache.get(0)), (96, 64))
    pixels, error = classify.prepare(str(path), preprocessing)
    assert error == "" and torch.equal(torch.from_numpy(pixels).permute(2, 0, 1), cached[0][0])
