"""data_set/split_data.py: counts, disjointness, determinism, overwrite policy and the CLI."""
import os

import pytest
from PIL import Image

from helpers import SPLIT_DATA, run_script
from training.data import DataError, split_dataset, val_count

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
    for name, n in SIZES.items():
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
    with pytest.raises(DataError, match="--force"):
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
    with pytest.raises(DataError, match="overlap"):
        split_dataset(source, tmp_path / "out", force=True, log=quiet)
    with pytest.raises(DataError, match="overlap"):
        split_dataset(source, source, log=quiet)
    assert len(os.listdir(source / "daisy")) == SIZES["daisy"] + 1


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_bad_ratio(source, tmp_path, ratio):
    with pytest.raises(DataError):
        split_dataset(source, tmp_path / "out", val_ratio=ratio, log=quiet)
    assert not (tmp_path / "out").exists()


def cli(*args):
    return run_script(SPLIT_DATA, args)


def test_cli(source, tmp_path):
    # One test for both runs: each process spends seconds importing torch (via data.py).
    dest = tmp_path / "out"
    ok = cli("--source", source, "--dest", dest, "--val-ratio", "0.2", "--seed", "5")
    assert ok.returncode == 0, ok.stderr
    assert "total" in ok.stdout and "daisy" in ok.stdout
    assert sum(len(v) for v in listing(dest / "val").values()) == 6

    missing = cli("--source", tmp_path / "nope", "--dest", tmp_path / "other")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert "--source" in lines[0]  # says what to do, not only what is wrong
