"""The train/val split: training/data.py's split_samples (what train.py holds out of a plain folder
of class folders, the very split it always gave) and split_dataset, and python -m data_set.split_data
that writes it out: counts, disjointness, determinism, the overwrite policy and the command line."""
import os
import random

import pytest
from PIL import Image

from data_set import split_data
from helpers import assert_clean_error, call
from plumbing.options import UserError
from training import data
from training.data import split_dataset, val_count

pytestmark = pytest.mark.quick

SIZES = {"daisy": 20, "roses": 7, "tulips": 2}


def quiet(*args):
    pass


def make_source(root, sizes=SIZES):
    for name, n in sizes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i * 10 % 256, 0, 0)).save(folder / f"{name}_{i:03d}.png")
        (folder / "notes.txt").write_text("not an image")
    (root / "LICENSE.txt").write_text("credits")
    return root


def listing(folder):
    """{class: sorted file names} under folder."""
    return {c: sorted(os.listdir(folder / c)) for c in sorted(os.listdir(folder))}


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "photos")


def test_counts_and_every_file_in_exactly_one_split(source, tmp_path):
    dest = tmp_path / "out"
    counts = split_dataset(source, dest, val_ratio=0.2, log=quiet)
    assert counts == {"daisy": (16, 4), "roses": (6, 1), "tulips": (1, 1)}
    train, val = listing(dest / "train"), listing(dest / "val")
    for name in SIZES:
        assert len(train[name]) == counts[name][0] and len(val[name]) == counts[name][1]
        assert not set(train[name]) & set(val[name])
        expected = sorted(f for f in os.listdir(source / name) if f.endswith(".png"))
        assert sorted(train[name] + val[name]) == expected
    assert sum(t + v for t, v in counts.values()) == sum(SIZES.values())


def test_val_count_rule():
    assert val_count(633, 0.1) == 63 and val_count(898, 0.1) == 89
    assert sum(val_count(n, 0.1) for n in (633, 898, 641, 699, 799)) == 364
    assert val_count(2, 0.1) == 1  # at least one when there are two
    assert val_count(1, 0.5) == 0  # never the whole class
    assert val_count(10, 0.99) == 9


def test_deterministic_per_seed(source, tmp_path):
    split_dataset(source, tmp_path / "a", seed=3, log=quiet)
    split_dataset(source, tmp_path / "b", seed=3, log=quiet)
    split_dataset(source, tmp_path / "c", seed=4, log=quiet)
    for part in ("train", "val"):
        assert listing(tmp_path / "a" / part) == listing(tmp_path / "b" / part)
    assert listing(tmp_path / "a" / "val")["daisy"] != listing(tmp_path / "c" / "val")["daisy"]


def test_refuses_to_overwrite_without_force(source, tmp_path):
    dest = tmp_path / "out"
    split_dataset(source, dest, seed=0, log=quiet)
    (dest / "train" / "daisy" / "stale.png").write_bytes(b"")
    with pytest.raises(UserError, match="--force"):
        split_dataset(source, dest, seed=1, log=quiet)
    assert (dest / "train" / "daisy" / "stale.png").exists()
    split_dataset(source, dest, seed=1, force=True, log=quiet)
    assert not (dest / "train" / "daisy" / "stale.png").exists()
    assert sum(len(v) for v in listing(dest / "train").values()) + \
        sum(len(v) for v in listing(dest / "val").values()) == sum(SIZES.values())


def test_force_keeps_source_inside_dest(tmp_path):
    dest = tmp_path / "flower_data"
    source = make_source(dest / "flower_photos")
    split_dataset(source, dest, log=quiet)
    split_dataset(source, dest, force=True, log=quiet)
    assert sorted(os.listdir(dest)) == ["flower_photos", "train", "val"]
    assert len(os.listdir(source / "daisy")) == SIZES["daisy"] + 1


def test_refuses_dest_overlapping_source(tmp_path):
    source = make_source(tmp_path / "out" / "train")
    with pytest.raises(UserError, match="overlap"):
        split_dataset(source, tmp_path / "out", force=True, log=quiet)
    with pytest.raises(UserError, match="overlap"):
        split_dataset(source, source, log=quiet)
    assert len(os.listdir(source / "daisy")) == SIZES["daisy"] + 1


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_bad_ratio(source, tmp_path, ratio):
    with pytest.raises(UserError, match="val ratio must be between 0 and 1"):
        split_dataset(source, tmp_path / "out", val_ratio=ratio, log=quiet)
    assert not (tmp_path / "out").exists()


def test_the_command_line(source, tmp_path):
    dest = tmp_path / "out"
    code, out, err = call(split_data, ["--source", source, "--dest", dest, "--val-ratio", "0.2", "--seed", "5"])
    assert code == 0, err
    assert "total" in out and "daisy" in out
    assert sum(len(v) for v in listing(dest / "val").values()) == 6
    code, _, err = call(split_data, ["--source", tmp_path / "nope", "--dest", tmp_path / "other"])
    line = assert_clean_error(code, err, "nope", "--source")  # says what to do, not only what is wrong
    assert code == 2 and err.strip() == line


# ---------------------------------------------------------------------------------------------
# split_samples: one pass, and the very split it always gave
# ---------------------------------------------------------------------------------------------
def split_as_before(samples, classes, val_ratio, seed):
    """split_samples as it was written before it became one pass: a scan of all samples per class."""
    train_part, val_part = [], []
    for index, name in enumerate(classes):
        files = [path for path, target in samples if target == index]
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val = data.val_count(len(files), val_ratio)
        val_part.extend((path, index) for path in files[:n_val])
        train_part.extend((path, index) for path in files[n_val:])
    return sorted(train_part, key=lambda s: (s[1], s[0])), sorted(val_part, key=lambda s: (s[1], s[0]))


def random_samples(seed, classes=60):
    rng = random.Random(seed)
    names = [f"class_{k:03d}" for k in range(classes)]
    return sorted((f"/d/{c}/{rng.random():.12f}.jpg", k) for k, c in enumerate(names)
                  for _ in range(rng.randint(1, 40))), names


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_samples_gives_the_split_it_always_gave(seed):
    samples, classes = random_samples(seed)
    for ratio in (0.1, 0.25):
        assert data.split_samples(samples, classes, ratio, seed) == split_as_before(samples, classes, ratio, seed)


def test_the_split_seed_changes_the_held_out_images_not_their_counts():
    samples, classes = random_samples(3, classes=3)
    _, a = data.split_samples(samples, classes, 0.5, seed=0)
    _, b = data.split_samples(samples, classes, 0.5, seed=1)
    assert [k for _, k in a] == [k for _, k in b]  # the same counts per class
    assert a != b
