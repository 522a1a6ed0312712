"""data_set/check.py: exact and near copies, leakage across the split, conflicting labels, the CSV,
the exit codes, and the band search against comparing every pair."""
import csv
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import train
from data_set import check
from helpers import TEXTURE_SIZE, call, texture, train_argv, write_corrupt
from training.data import find_classes, list_images, split_samples

pytestmark = pytest.mark.quick

SIZE = TEXTURE_SIZE


def make_folder(root, per_class=10, classes=("daisy", "roses"), first_seed=0):
    """root/<class>/<class>_NN.jpg, all different pictures; returns the paths by class."""
    paths, seed = {}, first_seed
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / name / f"{name}_{i:02d}.jpg"
            texture(seed).save(path, quality=95)
            paths.setdefault(name, []).append(path)
            seed += 1
    return paths


def run_check(capsys, *argv):
    code = check.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_groups(path):
    """{group id: [(kind, file, class, part, distance)]} from --output's CSV."""
    groups = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            assert list(row) == check.CSV_FIELDS
            groups.setdefault(int(row["group"]), []).append(
                (row["kind"], row["file"], row["class"], row["part"], int(row["distance"])))
    return groups


def line(out, start):
    (found,) = [text for text in out.splitlines() if text.startswith(start)]
    return found


def test_exact_copies_under_another_name_and_in_another_class(tmp_path, capsys):
    root = tmp_path / "photos"
    paths = make_folder(root)
    shutil.copy(paths["daisy"][3], root / "daisy" / "copy_of_3.jpg")
    shutil.copy(paths["daisy"][5], root / "roses" / "daisy_5_as_a_rose.jpg")
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--output", table)

    assert code == 0, err
    assert line(out, "exact copies").startswith("exact copies (identical bytes): 2 group(s) of 4 files:")
    assert "1 span classes" in line(out, "exact copies")
    assert line(out, "near copies").startswith("near copies (perceptual hashes within 8 bits, not all identical): "
                                               "0 group(s)")
    conflicting = out.split("conflicting labels")[1]
    assert "daisy/daisy_05.jpg (daisy" in conflicting and "roses/daisy_5_as_a_rose.jpg (roses" in conflicting
    groups = read_groups(table)
    assert sorted(sorted((kind, file, name, d) for kind, file, name, _, d in g) for g in groups.values()) == [
        [("exact", str(root / "daisy" / "copy_of_3.jpg"), "daisy", 0),
         ("exact", str(paths["daisy"][3]), "daisy", 0)],
        [("exact", str(paths["daisy"][5]), "daisy", 0),
         ("exact", str(root / "roses" / "daisy_5_as_a_rose.jpg"), "roses", 0)]]


def test_near_copies_resized_and_recompressed(tmp_path, capsys):
    root = tmp_path / "photos"
    paths = make_folder(root)
    original = Image.open(paths["roses"][2])
    original.resize((SIZE[0] // 2, SIZE[1] // 2), Image.Resampling.LANCZOS).save(root / "roses" / "half.jpg",
                                                                                  quality=95)
    original.save(root / "roses" / "quality_60.jpg", quality=60)
    original.save(root / "roses" / "as_png.png")
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--output", table)

    assert code == 0, err
    assert line(out, "exact copies").startswith("exact copies (identical bytes): 0 group(s)")
    assert line(out, "near copies").startswith("near copies (perceptual hashes within 8 bits, not all identical): "
                                               "1 group(s) of 4 files: ")
    assert "0 span classes" in line(out, "near copies")
    (group,) = read_groups(table).values()
    assert sorted(file for _, file, _, _, _ in group) == sorted(
        str(p) for p in (paths["roses"][2], root / "roses" / "half.jpg", root / "roses" / "quality_60.jpg",
                         root / "roses" / "as_png.png"))
    assert {kind for kind, *_ in group} == {"near"}
    assert all(d <= 8 for *_, d in group) and group[0][4] == 0


def test_distinct_images_give_no_group(tmp_path, capsys):
    root = tmp_path / "photos"
    make_folder(root, per_class=10)
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--output", table)

    assert code == 0, err
    assert "exact copies (identical bytes): 0 group(s) of 0 files" in out
    assert "near copies (perceptual hashes within 8 bits, not all identical): 0 group(s) of 0 files" in out
    assert line(out, "leakage:").startswith("leakage: 0 of 2 val photos (0.0%)")
    assert re.search(r"^daisy +9 +1 +10$", out, re.M) and re.search(r"^total +18 +2 +20$", out, re.M)
    assert line(out, "image sizes:") == "image sizes: most common 96x72 (20); shorter side 72-72 px (median 72)"
    assert read_groups(table) == {}
    hashes = [check.near_hash(texture(seed)) for seed in range(20)]
    assert min(check.hash_distance(a, b) for k, a in enumerate(hashes) for b in hashes[k + 1:]) > 8


def test_leakage_in_a_split_when_val_holds_a_copy_of_a_training_photo(tmp_path, capsys):
    root = tmp_path / "split"
    train = make_folder(root / "train", per_class=6)
    make_folder(root / "val", per_class=2, first_seed=100)
    texture(1).resize((SIZE[0] // 2, SIZE[1] // 2)).save(root / "val" / "daisy" / "small_daisy_01.jpg")
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--output", table)

    assert code == 0, err
    assert "a split (train/ and val/)" in line(out, "data:")
    assert "1 cross train/val" in line(out, "near copies")
    assert line(out, "leakage:").startswith("leakage: 1 of 5 val photos (20.0%) have an exact or near copy in train")
    (group,) = read_groups(table).values()
    assert sorted((file, part) for _, file, _, part, _ in group) == [
        (str(train["daisy"][1]), "train"), (str(root / "val" / "daisy" / "small_daisy_01.jpg"), "val")]


def test_a_plain_folder_is_split_as_train_py_splits_it(tmp_path, capsys):
    root = tmp_path / "photos"
    paths = make_folder(root, per_class=8)
    for name in ("daisy", "roses"):  # every photo twice: each one's part shows in the CSV
        for path in paths[name]:
            shutil.copy(path, path.with_name("again_" + path.name))
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--val-ratio", "0.25", "--split-seed", "3", "--output", table)

    assert code == 0, err
    assert "(val ratio 0.25, split seed 3)" in line(out, "data:")
    classes = find_classes(root)
    _, val = split_samples(list_images(root, classes), classes, val_ratio=0.25, seed=3)
    held_out = {path for path, _ in val}
    parts = {file: part for g in read_groups(table).values() for _, file, _, part, _ in g}
    assert len(parts) == 32 and {f for f, part in parts.items() if part == "val"} == held_out
    crossing = sum(len({parts[str(p)], parts[str(p.with_name("again_" + p.name))]}) == 2
                   for name in paths for p in paths[name])
    assert f"exact copies (identical bytes): 16 group(s) of 32 files: {crossing} cross train/val" in out


def test_unreadable_files_are_listed_and_the_run_still_succeeds(tmp_path, capsys):
    root = tmp_path / "photos"
    make_folder(root, per_class=3)
    write_corrupt(root / "roses" / "broken.jpg")
    (root / "daisy" / "empty.jpg").write_bytes(b"")

    code, out, err = run_check(capsys, root)

    assert code == 0, err
    assert "unreadable: 2 file(s):" in out
    assert re.search(r"^  daisy/empty\.jpg \(an empty file\)$", out, re.M)
    assert re.search(r"^  roses/broken\.jpg \(.+\)$", out, re.M)


def test_byte_identical_unreadable_files_are_listed_once_and_are_no_copies(tmp_path, capsys):
    # three empty files and three copies of one broken file, across classes and across train/val:
    # the same bytes, but no picture, so no copy of one, no label conflict and no leakage
    root = tmp_path / "split"
    make_folder(root / "train", per_class=3)
    make_folder(root / "val", per_class=1, first_seed=100)
    places = (("train", "daisy"), ("train", "roses"), ("val", "daisy"))
    bad = [root / part / name / f"{kind}.jpg" for part, name in places for kind in ("empty", "broken")]
    for path in bad:
        if path.stem == "empty":
            path.write_bytes(b"")
        else:
            write_corrupt(path)
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--output", table)

    assert code == 0, err
    assert "unreadable: 6 file(s):" in out
    for path in bad:  # listed once, as unreadable, and nowhere else
        (listed,) = [text for text in out.splitlines() if str(path.relative_to(root)) in text]
        assert listed.startswith(f"  {path.relative_to(root)} (")
    assert line(out, "exact copies").startswith("exact copies (identical bytes): 0 group(s) of 0 files")
    assert line(out, "near copies").startswith("near copies (perceptual hashes within 8 bits, not all identical): "
                                               "0 group(s) of 0 files")
    assert line(out, "leakage:").startswith("leakage: 0 of 2 val photos (0.0%)")  # the 2 that can be read
    assert "crossing train/val: 0 group(s)" in out and "conflicting labels (one picture in several classes): " \
        "0 group(s)" in out
    assert read_groups(table) == {}


def test_a_folder_where_nothing_decodes_still_gets_its_report(tmp_path, capsys):
    write_corrupt(tmp_path / "photos" / "daisy" / "broken.jpg")
    code, out, err = run_check(capsys, tmp_path / "photos")
    assert code == 0, err
    assert "unreadable: 1 file(s):" in out and "image sizes: no photo could be decoded" in out
    assert "leakage: 0 of 0 val photos" in out


NO_IMAGES = "(.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, .gif)"


def test_empty_class_folders_are_findings_and_the_rest_is_still_checked(tmp_path, capsys):
    root = tmp_path / "photos"
    paths = make_folder(root, per_class=4, classes=("daisy", "tulips"))
    shutil.copy(paths["daisy"][1], root / "daisy" / "copy_of_1.jpg")
    (root / "roses").mkdir()
    (root / "sunflowers").mkdir()
    (root / "sunflowers" / "notes.txt").write_text("no photos yet")  # no image either
    table = tmp_path / "groups.csv"

    code, out, err = run_check(capsys, root, "--output", table)

    # the whole report, then the one line train.py would stop at, with its exit status
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.splitlines()[-1] == (f"error: class folders {root / 'roses'}, {root / 'sunflowers'} have no images "
                                    f"{NO_IMAGES}: add images or remove them")
    assert line(out, "empty class folders:") == "empty class folders: 2: roses, sunflowers"
    assert re.search(r"^roses +0 +0 +0$", out, re.M) and re.search(r"^total +7 +2 +9$", out, re.M)
    assert line(out, "exact copies").startswith("exact copies (identical bytes): 1 group(s) of 2 files")
    assert len(read_groups(table)) == 1


def test_an_empty_class_folder_of_a_split_is_named_by_its_part(tmp_path, capsys):
    root = tmp_path / "split"
    make_folder(root / "train", per_class=3)
    make_folder(root / "val", per_class=1, first_seed=100)
    for photo in (root / "train" / "roses").iterdir():
        photo.unlink()

    code, out, err = run_check(capsys, root)

    assert code == 2 and err.count("error:") == 1
    assert err.splitlines()[-1] == (f"error: class folder {root / 'train' / 'roses'} has no images {NO_IMAGES}: "
                                    "add images or remove the folder")
    assert line(out, "empty class folders:") == f"empty class folders: 1: {os.path.join('train', 'roses')}"
    assert line(out, "leakage:").startswith("leakage: 0 of 2 val photos")


def test_the_check_ends_with_the_line_and_status_train_py_stops_with(tmp_path, capsys):
    root = tmp_path / "photos"
    make_folder(root, per_class=2)
    (root / "tulips").mkdir()

    code, _, err = run_check(capsys, root)
    train_code, _, train_err = call(train, train_argv(root, tmp_path / "out"))

    assert train_code == code == 2
    assert err.splitlines()[-1] == train_err.splitlines()[-1] == (
        f"error: class folder {root / 'tulips'} has no images {NO_IMAGES}: add images or remove the folder")


def test_a_folder_of_empty_class_folders_still_gets_its_report(tmp_path, capsys):
    for name in ("daisy", "roses"):
        (tmp_path / "photos" / name).mkdir(parents=True)
    code, out, err = run_check(capsys, tmp_path / "photos")
    assert code == 2 and err.splitlines()[-1].startswith("error: class folders ") and err.count("error:") == 1
    assert "empty class folders: 2: daisy, roses" in out and "hashed 0 photos" in out


def test_a_folder_train_py_takes_exits_with_0(tmp_path, capsys):
    make_folder(tmp_path / "photos", per_class=2)
    code, out, err = run_check(capsys, tmp_path / "photos")
    assert code == 0 and "error" not in err and line(out, "empty class folders:") == "empty class folders: 0"


def test_a_class_folder_named_like_the_not_sure_answer_is_a_finding(tmp_path, capsys):
    """train.py refuses a class "unknown" (predict.py's answer when not sure); the check says so and
    reports the rest."""
    make_folder(tmp_path / "photos", per_class=3, classes=("daisy", "unknown"))
    code, out, _ = run_check(capsys, tmp_path / "photos")
    assert code == 0
    assert "class folder unknown" in line(out, "class names:") and "train.py refuses it" in out
    assert "exact copies (identical bytes): 0 group(s)" in out
    make_folder(tmp_path / "fine", per_class=3)
    code, out, _ = run_check(capsys, tmp_path / "fine")
    assert code == 0 and "class names:" not in out


@pytest.mark.parametrize("layout", ["missing", "no class folders"])
def test_one_line_errors(tmp_path, capsys, layout):
    root = tmp_path / "photos"
    if layout == "no class folders":
        root.mkdir()
        texture(0).save(root / "loose.jpg")
    code, out, err = run_check(capsys, root)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (f"error: data folder {root} does not exist: DIR is a folder of class folders "
                   "(DIR/<class>/<images>) or of a split (DIR/train/<class>/, DIR/val/<class>/)\n"
                   if layout == "missing" else
                   f"error: {root} has no class folders: expected {root}/<class name>/<images>\n")


def test_output_must_be_a_csv_file(tmp_path, capsys):
    make_folder(tmp_path / "photos", per_class=1)
    code, out, err = run_check(capsys, tmp_path / "photos", "--output", tmp_path / "groups.txt")
    assert code == 2 and err == f"error: --output {tmp_path / 'groups.txt'}: the file name must end in .csv\n"


@pytest.mark.parametrize("count", [50, 3000])
def test_band_search_finds_exactly_the_pairs_that_comparing_all_pairs_finds(count):
    rng = np.random.default_rng(count)
    base = rng.integers(0, 2 ** 63, count // 2, dtype=np.uint64) << np.uint64(1)
    flips = np.zeros(len(base), dtype=np.uint64)
    for _ in range(6):  # planted neighbours 0 to 6 bits away (two flips of a bit cancel)
        flips ^= np.uint64(1) << rng.integers(0, 64, len(base)).astype(np.uint64)
    hashes = np.unique(np.concatenate([base, base ^ flips, base[:20] ^ np.uint64(2 ** 64 - 1)]))
    everything = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    upper = np.triu_indices(len(hashes), 1)
    plans = set()
    for threshold in (0, 1, 3, 6, 8, 10, 12):
        plans.add(check.search_plan(len(hashes), threshold))
        i, j, distance = check.near_pairs(hashes, threshold, block=4096)
        close = everything[upper] <= threshold
        assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(
            zip(upper[0][close].tolist(), upper[1][close].tolist(), strict=True))
        assert (distance == everything[i, j]).all() and (i < j).all()
    assert any(radius > 0 for _, radius in plans) or count < 1000


@pytest.mark.parametrize("count", [0, 1])
def test_band_search_with_fewer_than_two_hashes(count):
    assert all(len(a) == 0 for a in check.near_pairs(np.arange(count, dtype=np.uint64), 8))
