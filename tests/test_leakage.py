"""train.py's leakage line: val images that are copies of training images, found from the perceptual
hashes the image cache keeps as the first epoch decodes the images (with the cache on or off)."""
import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train
from helpers import TEXTURE_SIZE, call, texture, train_argv, write_truncated_jpeg
from inference.images import HASH_DECODE_SIDE, Preprocessing, hash_distance, load_image, near_hash, reduced_for_hash
from training import data, leakage
from training.image_cache import SharedImageCache

SIZE = TEXTURE_SIZE


def make_split(root, n_train=6, n_val=2, classes=("daisy", "roses")):
    """root/{train,val}/<class>/<class>_NN.jpg, every file a different picture; returns root."""
    seed = 0
    for part, n in (("train", n_train), ("val", n_val)):
        for name in classes:
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                texture(seed).save(root / part / name / f"{name}_{i:02d}.jpg", quality=95)
                seed += 1
    return root


def add_copies(root):
    """A training photo copied into val under another name and class, and another one resized to half
    and saved again at JPEG quality 70: [(val copy, training original)]."""
    exact = (root / "val" / "roses" / "another_name.jpg", root / "train" / "daisy" / "daisy_01.jpg")
    shutil.copy(exact[1], exact[0])
    resized = (root / "val" / "daisy" / "smaller.jpg", root / "train" / "roses" / "roses_03.jpg")
    with Image.open(resized[1]) as original:
        original.resize((SIZE[0] // 2, SIZE[1] // 2), Image.Resampling.BILINEAR).save(resized[0], quality=70)
    return [exact, resized]


def datasets(root, capacity=2 ** 24, workers=0):
    """The training and val ImageDatasets of a split under root, each with its own cache, loaded once
    (through a loader with that many forked workers): what train.py's first epoch leaves."""
    loaded = []
    for part in ("train", "val"):
        folder = str(root / part)
        samples = data.list_images(folder, data.find_classes(folder))
        cache = SharedImageCache.create(len(samples), capacity, max(workers, 1))
        dataset = data.ImageDataset(samples, data.EvalTransform(Preprocessing(48, 48)), cache, substitute=False)
        loader = data.make_loader(dataset, data.EpochSampler(len(dataset), False, pad=False), 4, workers,
                                  torch.device("cpu"))
        assert sum(len(batch[0]) for batch in loader) == len(samples)
        loaded.append(dataset)
    return loaded


def read_pairs(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == leakage.LEAKAGE_FIELDS
    return [(val, train_file, int(d)) for val, train_file, d in rows[1:]]


def test_train_py_says_in_one_line_which_val_images_copy_training_ones(tmp_path):
    root = make_split(tmp_path / "data")
    copies = add_copies(root)
    out = tmp_path / "out"

    code, stdout, stderr = call(train, train_argv(root, out, "--image-size", 48, epochs=1))

    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if "leakage" in line]
    assert lines == [f"leakage: 2 of 6 val images are copies of training images (perceptual hashes within 8 bits): "
                     f"the pairs are in {out / 'leakage.csv'}; `python -m data_set.check {root}` finds every copy "
                     "in the data"]
    pairs = read_pairs(out / "leakage.csv")
    assert [(v, t) for v, t, _ in pairs] == sorted((str(v), str(t)) for v, t in copies)
    distances = dict(((v, t), d) for v, t, d in pairs)
    assert distances[str(copies[0][0]), str(copies[0][1])] == 0
    assert 0 <= distances[str(copies[1][0]), str(copies[1][1])] <= 8


def test_no_line_and_no_list_when_no_val_image_copies_a_training_one(tmp_path):
    root = make_split(tmp_path / "data")
    (tmp_path / "leakage.csv").write_text("val_file,train_file,distance\nold,run,0\n")  # a run before this one
    train_set, val_set = datasets(root)
    lines = []

    leakage.check_leakage(train_set, val_set, str(tmp_path), str(root), torch.device("cpu"), lines.append)

    assert lines == []
    assert not (tmp_path / "leakage.csv").exists()


@pytest.mark.quick
def test_byte_identical_unreadable_files_in_train_and_val_are_no_leakage(tmp_path):
    # Empty files never reach the datasets (the start-up check skips them), but a photo whose header
    # passes and whose pixels end early does: copies of one such file in train and val are the same
    # bytes and no picture. Only a decoded image leaves a hash in the cache, so they are no pair.
    root = make_split(tmp_path / "data")
    for part in ("train", "val"):
        (root / part / "daisy" / "empty.jpg").write_bytes(b"")
        write_truncated_jpeg(root / part / "daisy" / "truncated.jpg")
    train_set, val_set = datasets(root)
    lines = []

    leakage.check_leakage(train_set, val_set, str(tmp_path), str(root), torch.device("cpu"), lines.append)

    assert sorted(val_set.unreadable()) == [str(root / "val" / "daisy" / name) for name in ("empty.jpg",
                                                                                           "truncated.jpg")]
    assert lines == [] and not (tmp_path / "leakage.csv").exists()


def test_the_hashes_are_kept_with_the_cache_off_and_by_loader_workers(tmp_path):
    root = make_split(tmp_path / "data")
    copies = add_copies(root)
    train_set, val_set = datasets(root, capacity=0, workers=1)  # --cache off: statuses and hashes only
    lines = []

    leakage.check_leakage(train_set, val_set, str(tmp_path), str(root), torch.device("cpu"), lines.append)

    assert len(lines) == 1 and lines[0].startswith("leakage: 2 of 6 val images are copies of training images")
    assert [(v, t) for v, t, _ in read_pairs(tmp_path / "leakage.csv")] == sorted((str(v), str(t)) for v, t in copies)
    indices, hashes = train_set.cache.hashes()
    assert indices.tolist() == list(range(len(train_set)))
    path = train_set.samples[5][0]
    assert int(hashes[5]) == near_hash(reduced_for_hash(Image.open(path).convert("RGB")))


def test_a_photo_decoded_whole_is_hashed_at_the_scale_data_set_check_decodes_it(tmp_path):
    path = tmp_path / "big.jpg"
    texture(7, size=(800, 600)).save(path, quality=90)
    whole = load_image(path)

    reduced = reduced_for_hash(whole)

    assert whole.size == (800, 600) and reduced.size == (100, 75)  # by 8: the most a JPEG's draft reduces
    assert reduced_for_hash(texture(7, size=(200, 150))).size == (100, 75)  # by 2: 64 px a side or more
    assert reduced_for_hash(texture(7, size=(160, 120))).size == (160, 120)  # by 2, 60 px would be too few
    with Image.open(path) as drafted:  # what data_set/check.py hashes: the JPEG decoded at a reduced scale
        drafted.draft("RGB", (HASH_DECODE_SIDE, HASH_DECODE_SIDE))
        assert drafted.size == reduced.size
    assert hash_distance(near_hash(reduced), near_hash(load_image(path, min_side=HASH_DECODE_SIDE))) <= 2


def test_near_copies_pairs_each_val_image_with_every_training_image_near_it():
    base = 0x0123456789ABCDEF
    train_hashes = (np.array([10, 11, 12]), np.array([base, base ^ 0b111, base ^ (2 ** 40 - 1)], dtype=np.uint64))
    val_hashes = (np.array([0, 1, 2]), np.array([base, ~base & (2 ** 64 - 1), base ^ (1 << 63)], dtype=np.uint64))

    pairs = leakage.near_copies(train_hashes, val_hashes)

    assert pairs == [(0, 10, 0), (0, 11, 3), (2, 10, 1), (2, 11, 4)]
    assert hash_distance(base, base ^ (2 ** 40 - 1)) == 40
    assert leakage.near_copies(train_hashes, (np.array([], dtype=np.int64), np.array([], dtype=np.uint64))) == []


def test_a_line_before_every_training_image_was_drawn_says_how_many_were(tmp_path):
    root = make_split(tmp_path / "data")
    add_copies(root)
    train_set, val_set = datasets(root, capacity=0)
    train_set.cache.status[:] = 0  # as if --sampler balanced had drawn only the first 4 of the 12 so far
    for index in range(4):
        train_set.pixels(index)
    lines = []

    leakage.check_leakage(train_set, val_set, str(tmp_path), str(root), torch.device("cpu"), lines.append)

    # daisy_01 (index 1) is among those drawn, roses_03 (index 9) is not yet
    assert len(lines) == 1
    assert lines[0].startswith("leakage: 1 of 6 val images are copies of training images (4 of 12 training images "
                               "drawn so far) (perceptual hashes within 8 bits)")
