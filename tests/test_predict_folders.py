"""predict.py on big folders: a .csv --output written as it goes, continued by the next run (after a
stop by a real signal, or a row torn by a kill), another model's file refused, and --sort-into
(hard links, copies where linking fails, name clashes, sources untouched, nothing added twice).

The session's small run (conftest.py); 12 photos in two folders whose files have
the same names (one/img_00.jpg and two/img_00.jpg...), classified 4 at a time, in this process."""
import csv
import errno
import os
import signal

import pytest

import predict
from helpers import COLORS, FP32, assert_clean_error, call, last_line, save_image, write_corrupt
from inference import classify

BATCH = 4


@pytest.fixture(scope="module")
def setup(small_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    run = small_run
    photos = root / "photos"
    for n, folder in enumerate(("one", "two")):
        for i in range(6):
            save_image(photos / folder / f"img_{i:02d}.jpg", COLORS[i % 3], seed=100 * n + i)
    reference = root / "reference.csv"
    code, out, err = call(predict, predict_argv(run["best"], [photos], "--output", reference))
    assert code == 0, err
    return {"best": run["best"], "photos": photos, "reference": reference}


def predict_argv(weights, photos, *extra):
    return [*FP32, *photos, "--weights", weights, "--batch-size", BATCH, "--workers", 0, *extra]


def run_predict(setup, *extra, more_photos=()):
    return call(predict, predict_argv(setup["best"], [setup["photos"], *more_photos], *extra))


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def snapshot(folder):
    """{path: (bytes, mtime_ns)} of every file under folder."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def signal_during_batch(monkeypatch, batch, *signals):
    """Classifier.assess that sends this process the signals (real ones, to predict.py's handlers)
    while it classifies the batch-th batch."""
    calls = {"n": 0}
    real = classify.Classifier.assess

    def assess(self, pixels, tta=False):
        calls["n"] += 1
        if calls["n"] == batch:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(self, pixels, tta)

    monkeypatch.setattr(classify.Classifier, "assess", assess)


def test_the_reference_csv_has_every_photo_once(setup):
    rows = rows_of(setup["reference"])
    assert rows[0] == ["file", "class", "probability", "daisy", "roses", "tulips"]
    files = [r[0] for r in rows[1:]]
    assert files == sorted(str(p) for p in setup["photos"].rglob("*.jpg")) and len(files) == 12


@pytest.mark.parametrize("signals, code, written", [
    ((signal.SIGTERM,), 128 + signal.SIGTERM, 2 * BATCH),  # stops after the batch in hand
    ((signal.SIGINT, signal.SIGINT), 128 + signal.SIGINT, BATCH),  # a second Ctrl-C stops at once
], ids=["sigterm", "second-ctrl-c"])
def test_a_stopped_run_continues_to_the_same_csv(setup, tmp_path, monkeypatch, signals, code, written):
    monkeypatch.setattr(predict, "TABLE_ROWS", 4)  # 12 photos count as a big run: a bar, no table
    output = tmp_path / "p.csv"
    with monkeypatch.context() as patch:
        signal_during_batch(patch, 2, *signals)
        got, out, err = run_predict(setup, "--output", output)
    assert got == code, err
    assert last_line(err) == (f"interrupted: {written} of 12 photos written to {output}; "
                              "run the same command again to continue"), err
    assert "Traceback" not in err
    assert "classify" in err and "file " not in out  # the progress bar, not the table
    assert rows_of(output) == rows_of(setup["reference"])[:1 + written]

    got, out, err = run_predict(setup, "--output", output)
    assert got == 0, err
    assert f"{written} of 12 photos are in {output} already (delete it to start over), {12 - written} to go" in out
    assert output.read_bytes() == setup["reference"].read_bytes()  # the remaining batches as one run had them


def test_a_torn_last_row_is_cut_and_its_photo_redone(setup, tmp_path):
    lines = setup["reference"].read_bytes().splitlines(keepends=True)
    output = tmp_path / "p.csv"
    output.write_bytes(b"".join(lines[:9]) + lines[9][:25])  # 8 whole rows, the 9th cut by a kill mid-write
    code, out, err = run_predict(setup, "--output", output)
    assert code == 0, err
    assert "8 of 12 photos are in" in out and "cut short" in out
    assert output.read_bytes() == setup["reference"].read_bytes()

    code, out, err = run_predict(setup, "--output", output)  # nothing left: nothing added
    assert code == 0, err
    assert "12 of 12 photos are in" in out
    assert output.read_bytes() == setup["reference"].read_bytes()


@pytest.mark.parametrize("header, fragment", [
    ("file,class,probability,cats,dogs", "the classes cats, dogs, not this model's daisy, roses, tulips"),
    ("name,label", "the columns name, label"),
], ids=["other-classes", "other-columns"])
def test_another_models_csv_is_refused(setup, tmp_path, header, fragment):
    output = tmp_path / "p.csv"
    output.write_text(header + "\nx.jpg,cats,0.9,0.9,0.1\n")
    before = output.read_bytes()
    code, _, err = run_predict(setup, "--output", output)
    assert_clean_error(code, err, str(output), fragment, "pass another --output", "delete")
    assert len(err.strip().splitlines()) == 1
    assert output.read_bytes() == before


def test_big_runs_without_an_output_stream_the_table(setup, monkeypatch):
    monkeypatch.setattr(predict, "TABLE_ROWS", 4)
    code, out, err = run_predict(setup)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "class", "probability"] and len(lines) == 13
    expected = [(r[0], r[1]) for r in rows_of(setup["reference"])[1:]]
    assert [tuple(line.split()[:2]) for line in lines[1:]] == expected


def test_sort_into_links_every_photo_into_its_class(setup, tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    try:
        os.link(probe, tmp_path / "probe-link")
    except OSError as e:
        pytest.skip(f"no hard links in {tmp_path} ({e.strerror})")
    before = snapshot(setup["photos"])
    sorted_dir = tmp_path / "sorted"
    output = tmp_path / "p.csv"
    code, out, err = run_predict(setup, "--output", output, "--sort-into", sorted_dir)
    assert code == 0, err
    assert f"12 photos sorted into {sorted_dir}/<class>/ (12 linked, 0 copied, 0 there already)" in out
    assert snapshot(setup["photos"]) == before  # not moved, not changed

    placed = {p.stat().st_ino: p for p in sorted_dir.rglob("*") if p.is_file()}
    assert len(placed) == 12
    for file, class_name, *_ in rows_of(output)[1:]:
        link = placed[os.stat(file).st_ino]
        assert link.parent == sorted_dir / class_name
    names = sorted(p.name for p in placed.values())
    assert names.count("img_00.jpg") + names.count("img_00_2.jpg") == 2  # one/img_00.jpg and two/img_00.jpg
    assert len({p.read_bytes() for p in placed.values()}) == 12

    # the same command again: every photo is in the file and in its folder already
    code, out, err = run_predict(setup, "--output", output, "--sort-into", sorted_dir)
    assert code == 0, err
    assert "(0 linked, 0 copied, 12 there already)" in out
    assert len([p for p in sorted_dir.rglob("*") if p.is_file()]) == 12
    assert snapshot(setup["photos"]) == before


def test_sort_into_copies_where_linking_fails_and_skips_unreadable_photos(setup, tmp_path, monkeypatch):
    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)

    monkeypatch.setattr(os, "link", cross_device)
    bad = write_corrupt(tmp_path / "bad" / "img_00.jpg")
    before = snapshot(setup["photos"])
    sorted_dir = tmp_path / "sorted"
    code, out, err = run_predict(setup, "--sort-into", sorted_dir, more_photos=[bad])
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0]
    assert "(0 linked, 12 copied, 0 there already)" in out
    assert snapshot(setup["photos"]) == before

    copies = [p for p in sorted_dir.rglob("*") if p.is_file()]
    assert len(copies) == 12 and not [p for p in copies if p.name.endswith(".tmp")]
    sources = {(data, mtime): p for p, (data, mtime) in before.items()}
    for copy in copies:  # each a copy of its own photo, with the photo's times
        source = sources[(copy.read_bytes(), copy.stat().st_mtime_ns)]
        assert copy.stat().st_ino != source.stat().st_ino

    code, out, err = run_predict(setup, "--sort-into", sorted_dir, more_photos=[bad])
    assert code == 1
    assert "(0 linked, 0 copied, 12 there already)" in out
    assert len([p for p in sorted_dir.rglob("*") if p.is_file()]) == 12
