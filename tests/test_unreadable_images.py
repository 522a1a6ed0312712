"""Unreadable images in training (--bad-images): a file that is no image is found by the start-up
check and skipped (or stops the run with one line); one that only fails when decoded (a truncated
photo) is replaced in its batch by the next image the same way every time, listed when its epoch
ends, recorded in last.pth, left out of validation, and a resumed run keeps all of that exactly."""
import os
import signal

import pytest
import torch

import train
from helpers import (
    COLORS,
    assert_clean_error,
    call,
    dataset_of,
    load,
    make_tree,
    save_image,
    stop_after_step,
    train_argv,
    write_corrupt,
    write_truncated_jpeg,
)
from inference import images
from plumbing import stopping
from training import data


@pytest.mark.quick
def test_an_unreadable_image_is_replaced_by_the_next_one_the_same_way_every_time(tmp_path):
    root = tmp_path / "photos"
    for i in range(3):
        save_image(root / "a" / f"{i}.jpg", COLORS[0], seed=i)
    write_truncated_jpeg(root / "a" / "1x.jpg")  # sorted between 1.jpg and 2.jpg: index 2
    save_image(root / "b" / "0.jpg", COLORS[1])
    train_set = dataset_of(root, data.train_transform(32))
    assert [os.path.basename(p) for p, _ in train_set.samples] == ["0.jpg", "1.jpg", "1x.jpg", "2.jpg", "0.jpg"]
    first = train_set[(2, 99)]
    assert train_set.cache.bad_indices() == [2] and train_set.cache.found_bad
    substitute = train_set[(3, 99)]
    assert torch.equal(first[0], substitute[0]) and first[1:] == substitute[1:] == (0, True)
    assert torch.equal(train_set[(2, 99)][0], first[0])  # known now: not decoded again, the same answer
    val_set = dataset_of(root, data.EvalTransform(images.Preprocessing(40, 32)), substitute=False)
    image, target, valid = val_set[2]
    assert not valid and target == 0 and image.shape == (3, 32, 32)


def test_train_skips_unreadable_images_by_default(tmp_path):
    """Random bytes are no image: the start-up check finds them. A truncated JPEG starts like one:
    it is found when first decoded, listed when that epoch ends, replaced in its batch by the next
    image in every epoch after, and recorded in last.pth; a truncated val image is left out."""
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    corrupt = write_corrupt(data_dir / "train" / "daisy" / "x.jpg")
    truncated = write_truncated_jpeg(data_dir / "train" / "roses" / "half.jpg")
    truncated_val = write_truncated_jpeg(data_dir / "val" / "tulips" / "half.jpg")
    code, out, err = call(train, train_argv(data_dir, tmp_path / "out", "--image-size", 32, epochs=2))
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "skipped 1 unreadable" in skipped[0] and str(corrupt) in skipped[0], out
    assert "4 train, 4 val images" in out
    found = [line for line in out.splitlines() if "unreadable image(s) in epoch" in line]
    assert found == [f"found 2 unreadable image(s) in epoch 1, left out from now on: {truncated}; {truncated_val}"]
    assert load(tmp_path / "out" / "last.pth")["bad_images"] == [str(truncated), str(truncated_val)]
    assert (tmp_path / "out" / "best.pth").is_file()


@pytest.mark.quick
def test_bad_images_error_names_the_file_at_start(tmp_path):
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    bad = write_corrupt(data_dir / "train" / "daisy" / "x.jpg")
    code, out, err = call(train, train_argv(data_dir, tmp_path / "out", "--bad-images", "error"))
    assert_clean_error(code, err, str(bad), "--bad-images skip")
    assert "train 1/" not in out


def test_bad_images_error_stops_at_a_photo_that_fails_to_decode(tmp_path):
    data_dir = make_tree(tmp_path / "data", n_train=1, n_val=1)
    truncated = write_truncated_jpeg(data_dir / "train" / "roses" / "half.jpg")
    code, out, err = call(train, train_argv(data_dir, tmp_path / "out", "--image-size", 32, "--bad-images", "error"))
    assert_clean_error(code, err, f"cannot read image {truncated}", "--bad-images skip")
    assert "train 1/" in out and not (tmp_path / "out" / "best.pth").exists()


def test_resume_holds_exactly_with_an_image_found_unreadable_mid_epoch(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    truncated = write_truncated_jpeg(tree / "train" / "roses" / "roses_02b.jpg")
    argv = train_argv(tree, tmp_path / "A", "--image-size", 48)
    assert call(train, argv)[0] == 0
    reference = load(tmp_path / "A" / "last.pth")
    assert reference["bad_images"] == [str(truncated)]
    out, saved = tmp_path / "B", tmp_path / "after_step_3.pth"
    argv = train_argv(tree, out, "--image-size", 48)
    with monkeypatch.context() as m:
        m.setattr(stopping.StopRequest, "check", stop_after_step(4, out, saved))
        assert call(train, argv + ["--save-every", "1"])[0] == 128 + signal.SIGTERM
    code, stdout, err = call(train, argv + ["--resume", saved, "--save-every", "0"])
    assert code == 0, err
    resumed = load(out / "last.pth")
    assert resumed["bad_images"] == reference["bad_images"]
    assert all(torch.equal(resumed["model"][k], reference["model"][k]) for k in reference["model"])
