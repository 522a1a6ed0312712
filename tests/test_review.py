"""DIR/review.csv (data_set/review.py): what a review decided, read with one-line errors that name
the line, appended by concurrent writers without losing a row, and applied the same way by
train.py (its start-up line, its counts, its checkpoint), --eval-only and data_set.check; --review
off ignores it."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import train
from data_set import check, review
from helpers import COLORS, REPO, assert_clean_error, call, eval_argv, load, save_image, script_env, train_argv
from plumbing import stopping

CLASSES = ("daisy", "roses", "tulips")
HEADER = "file,action,class,time\n"


def make_folder(root, per_class=8):
    """root/<class>/<class>_NN.jpg, a folder of class folders (train.py splits 1 of each class into val)."""
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            save_image(root / name / f"{name}_{i:02d}.jpg", COLORS[k], seed=100 * k + i)
    return root


def write_review(root, *rows):
    (root / "review.csv").write_text(HEADER + "".join(line + "\n" for line in rows))
    return root / "review.csv"


# ---------------------------------------------------------------------------------------------
# Reading: one line naming the line, and nothing changed
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_the_last_decision_for_a_photo_counts_and_blank_lines_are_skipped(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=2)
    write_review(root, "daisy/daisy_00.jpg,exclude,,t1", "", "roses/roses_01.jpg,relabel,tulips,t2",
                 "daisy/daisy_00.jpg,keep,,t3", "roses/roses_01.jpg,relabel,daisy,t4")
    decisions = review.check_decisions(review.read(root), root, CLASSES)
    assert {name: (d.action, d.new_class, d.line) for name, d in decisions.items()} == {
        "daisy/daisy_00.jpg": ("keep", "", 5), "roses/roses_01.jpg": ("relabel", "daisy", 6)}
    assert review.read(tmp_path) == {}  # no review.csv: nothing decided


BAD_ROWS = {
    "a photo that is not there": ("daisy/daisy_00.jpg,keep,,t\ndaisy/gone.jpg,exclude,,t", 3,
                                  "daisy/gone.jpg is not in"),
    "an unknown class": ("roses/roses_01.jpg,relabel,lilies,t", 2, "class 'lilies' is not one of the classes"),
    "too few fields": ("daisy/daisy_00.jpg,exclude,t", 2, "3 field(s) where a row has 4"),
    "an unknown action": ("daisy/daisy_00.jpg,delete,,t", 2, "unknown action 'delete'"),
    "a relabel without its class": ("daisy/daisy_00.jpg,relabel,,t", 2, "relabel names no class"),
    "a path out of the folder": ("../elsewhere.jpg,exclude,,t", 2, "'../elsewhere.jpg' is not a photo's path"),
}


@pytest.mark.quick
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_review_csv_is_one_line_naming_its_line_and_is_left_as_it_was(tmp_path, case):
    rows, line, words = BAD_ROWS[case]
    root = make_folder(tmp_path / "photos", per_class=2)
    path = write_review(root, rows)
    before = path.read_bytes()
    code, out, err = call(train, train_argv(root, tmp_path / "out"))
    message = assert_clean_error(code, err, f"{path} line {line}: {words}", "--review off")
    assert len(message.splitlines()) == 1
    assert path.read_bytes() == before
    code, _, err = call(check, [root])  # data_set.check reads it the same way
    assert_clean_error(code, err, f"{path} line {line}: {words}")


@pytest.mark.quick
def test_a_wrong_header_is_named_as_line_1(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=2)
    (root / "review.csv").write_text("path,decision\ndaisy/daisy_00.jpg,exclude\n")
    with pytest.raises(review.ReviewError, match=r"review.csv line 1: the header must be file,action,class,time"):
        review.read(root)


# ---------------------------------------------------------------------------------------------
# Appending: concurrent writers lose nothing
# ---------------------------------------------------------------------------------------------
class Meeting:
    """Holds the first thread that has looked at review.csv's size (os.fstat in review.append) until
    a second one has looked too, or is waiting for the file's lock (fcntl.flock): where the lock
    is taken, the second can only wait, and the first goes on; without it, both see the size of
    the file before either writes. No clock decides anything (the timeout only ends a test gone
    wrong)."""

    def __init__(self, monkeypatch):
        self.condition = threading.Condition()
        self.looked, self.waiting_for_lock = 0, 0
        real_fstat, real_flock = os.fstat, review.fcntl.flock

        def fstat(fd):
            size = real_fstat(fd)
            with self.condition:
                self.looked += 1
                self.condition.notify_all()
                self.condition.wait_for(lambda: self.looked >= 2 or self.waiting_for_lock, timeout=60)
            return size

        def flock(fd, operation):
            with self.condition:
                self.waiting_for_lock += 1
                self.condition.notify_all()
            try:
                return real_flock(fd, operation)
            finally:
                with self.condition:
                    self.waiting_for_lock -= 1

        monkeypatch.setattr(review.os, "fstat", fstat)
        monkeypatch.setattr(review.fcntl, "flock", flock)


@pytest.mark.quick
@pytest.mark.skipif(review.fcntl is None, reason="file locks are fcntl's (POSIX)")
def test_two_first_decisions_at_once_make_one_header(tmp_path, monkeypatch):
    """Two threads append the first rows of a new review.csv at the same moment: each must see the
    other's header, or the file gets two (the race the lock is there for: O_APPEND alone keeps
    each row whole but lets both writers find the file empty)."""
    Meeting(monkeypatch)
    errors = []

    def decide(who):
        try:
            review.append(tmp_path, [(f"{who}/a.jpg", "exclude", "")])
        except Exception as e:  # reported below, with the file
            errors.append(e)

    writers = [threading.Thread(target=decide, args=(who,)) for who in ("first", "second")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    monkeypatch.undo()
    text = (tmp_path / "review.csv").read_text()
    assert not errors and text.count("file,action") == 1 and text.startswith(HEADER), (errors, text)
    assert sorted(review.read(tmp_path)) == ["first/a.jpg", "second/a.jpg"]


@pytest.mark.quick
@pytest.mark.skipif(review.fcntl is None, reason="file locks are fcntl's (POSIX)")
def test_a_reader_never_sees_half_a_row(tmp_path, monkeypatch):
    """review.read while a writer holds the lock with half a row written: the reader waits for the
    whole row (a shared lock), where it would read "roses/b.jpg,rel" and refuse the file."""
    path = write_review(tmp_path, "roses/a.jpg,exclude,,t")
    condition, state = threading.Condition(), {"locking": False}
    real_flock = review.fcntl.flock

    def flock(fd, operation):
        with condition:
            state["locking"] = True
            condition.notify_all()
        return real_flock(fd, operation)

    result = {}

    def read():
        try:
            result["read"] = review.read(tmp_path)
        except Exception as e:
            result["read"] = e
        with condition:
            condition.notify_all()

    row = b"roses/b.jpg,relabel,tulips,t\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        real_flock(fd, review.fcntl.LOCK_EX)  # a writer, half way through its row
        os.write(fd, row[:15])
        monkeypatch.setattr(review.fcntl, "flock", flock)
        reader = threading.Thread(target=read)
        reader.start()
        with condition:  # the reader asks for the lock, or (without one) has read the file already
            condition.wait_for(lambda: state["locking"] or "read" in result, timeout=60)
        os.write(fd, row[15:])
    finally:
        os.close(fd)  # releases the writer's lock
    reader.join(timeout=60)
    assert isinstance(result["read"], dict), result["read"]
    assert {name: d.action for name, d in result["read"].items()} == {"roses/a.jpg": "exclude",
                                                                       "roses/b.jpg": "relabel"}


WRITER = """
import os, sys, time
from data_set import review
root, who, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not os.path.exists(go):
    time.sleep(0.01)
for i in range(count):
    review.append(root, [(f"{who}/{i:04d}.jpg", "relabel" if i % 2 else "exclude", "roses" if i % 2 else "")])
"""


@pytest.mark.quick
def test_two_processes_appending_at_once_lose_no_row(tmp_path):
    """Two real processes (two pages) appending at once: every row whole, none lost, one header.
    The thread tests above pin the header race down; this one is the same story end to end."""
    count = 20
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who, str(count), str(go)], cwd=REPO,
                                env=script_env()) for who in ("first", "second")]
    go.touch()  # both start together, on a file that neither has made yet
    for writer in writers:
        assert writer.wait(timeout=300) == 0
    text = (tmp_path / "review.csv").read_text()
    assert text.startswith(HEADER) and text.count("file,action") == 1
    rows = list(csv.reader(text.splitlines()[1:]))
    assert all(len(row) == 4 for row in rows)
    assert sorted(row[0] for row in rows) == sorted(f"{who}/{i:04d}.jpg" for who in ("first", "second")
                                                    for i in range(count))
    assert len(review.read(tmp_path)) == 2 * count


@pytest.mark.quick
def test_an_append_to_a_file_edited_without_a_last_newline_starts_a_new_line(tmp_path):
    root = make_folder(tmp_path / "photos", per_class=2)
    (root / "review.csv").write_text(HEADER + "daisy/daisy_00.jpg,exclude,,t")
    review.append(root, [("daisy/daisy_01.jpg", "relabel", "tulips")])
    assert {name: d.action for name, d in review.read(root).items()} == {"daisy/daisy_00.jpg": "exclude",
                                                                         "daisy/daisy_01.jpg": "relabel"}


# ---------------------------------------------------------------------------------------------
# Applying: training, --eval-only and data_set.check
# ---------------------------------------------------------------------------------------------
def data_line(out):
    (line,) = [text for text in out.splitlines() if text.startswith("data: ")]
    return line


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A folder of 3 x 8 photos (7 train and 1 val each) whose review.csv excludes two training
    photos and one val photo and relabels a training rose as a tulip, trained on for one epoch."""
    root = tmp_path_factory.mktemp("reviewed")
    photos = make_folder(root / "photos")
    found = check.find_photos(str(photos)).photos
    train_files = [review.relative(p.path, str(photos)) for p in found if p.part == "train"]
    val_files = [review.relative(p.path, str(photos)) for p in found if p.part == "val"]
    rose = next(f for f in train_files if f.startswith("roses/"))
    excluded = [train_files[0], train_files[-1], val_files[0]]
    write_review(photos, f"{excluded[0]},exclude,,t", f"{rose},relabel,daisy,t", f"{excluded[1]},exclude,,t",
                 f"{excluded[2]},exclude,,t", f"{rose},relabel,tulips,t")  # changed its mind: tulips
    code, out, err = call(train, train_argv(photos, root / "out", "--image-size", 32))
    assert code == 0, err
    return {"photos": photos, "out": root / "out", "stdout": out, "rose": rose, "excluded": excluded}


def test_training_leaves_out_the_excluded_photos_and_trains_the_relabelled_one_under_its_new_class(reviewed):
    out = reviewed["stdout"]
    assert "review.csv: 3 excluded, 1 relabelled" in out
    assert "21 train, 3 val" not in data_line(out) and "19 train, 2 val images" in data_line(out)
    best = load(reviewed["out"] / "best.pth")
    assert best["review"] == {"file": "review.csv", "excluded": sorted(reviewed["excluded"]),
                              "relabelled": {reviewed["rose"]: "tulips"}}
    with open(reviewed["out"] / "suspect_labels.csv", newline="") as f:  # what the run trained each photo as
        given = {review.relative(row["file"], str(reviewed["photos"])): row["given_class"] for row in csv.DictReader(f)}
    assert given[reviewed["rose"]] == "tulips" and len(given) == 19
    assert not set(reviewed["excluded"]) & set(given)


def test_eval_only_and_data_set_check_apply_it_the_same_way_and_review_off_ignores_it(reviewed, tmp_path, capsys):
    photos, weights = reviewed["photos"], reviewed["out"] / "best.pth"
    code, out, err = call(train, eval_argv(weights, photos, tmp_path / "eval"))
    assert code == 0, err
    assert "review.csv: 1 excluded, 0 relabelled" in out and "; 2 val images" in data_line(out)
    code, out, err = call(train, eval_argv(weights, photos, tmp_path / "eval", "--review", "off"))
    assert code == 0, err
    assert "not applied: --review off" in out and "; 3 val images" in data_line(out)

    assert check.run([str(photos)]) == 0
    out = capsys.readouterr().out
    assert "review.csv: 3 excluded, 1 relabelled" in out
    assert [line.split() for line in out.splitlines() if line.split()[:1] in (["roses"], ["tulips"], ["total"])] == [
        ["roses", "6", "1", "7"], ["tulips", "7", "1", "8"], ["total", "19", "2", "21"]]
    assert check.run([str(photos), "--review", "off"]) == 0
    assert ["total", "21", "3", "24"] in [line.split() for line in capsys.readouterr().out.splitlines()]


def test_a_resumed_run_trains_on_the_review_it_started_with(reviewed, tmp_path, monkeypatch):
    photos = shutil.copytree(reviewed["photos"], tmp_path / "photos")
    argv = train_argv(photos, tmp_path / "out", "--image-size", 32)
    with monkeypatch.context() as m:  # stop after the first step, as a SIGTERM would
        m.setattr(stopping.StopRequest, "check", lambda self, device, diverged=False, unreadable=False:
                  (diverged, True, unreadable))
        code, out, err = call(train, argv)
    assert code == 128 + signal.SIGTERM, err
    assert "19 train, 2 val images" in data_line(out)
    review.append(photos, [("roses/roses_02.jpg", "exclude", "")])  # decided while the run was stopped
    code, out, err = call(train, argv + ["--resume", tmp_path / "out" / "last.pth"])
    assert code == 0, err
    assert "review.csv: 3 excluded, 1 relabelled (as recorded when this run started" in out
    assert "19 train, 2 val images" in data_line(out)
    assert load(tmp_path / "out" / "best.pth")["review"] == load(reviewed["out"] / "best.pth")["review"]
