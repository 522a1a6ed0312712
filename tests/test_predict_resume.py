"""predict.py's .csv --output continued by a later run, without a trained model: a row cut short
anywhere (in the middle of a multi-byte character of a file name, or of a quoted name), the same
folder typed another way, a write that fails half way (a full disk: /dev/full), and --sort-into
inside the photos' own folder.

The model is a stand-in (predict.load_classifier patched): each class's logit is the mean of one
colour channel, so a photo's row depends on that photo alone, whatever its batch. The photos'
names are not ASCII: 12 of them in two folders, classified 4 at a time, in this process."""
import csv
import errno
import os

import numpy as np
import pytest

import predict
from helpers import CLASSES, COLORS, assert_clean_error, call, save_image
from inference import classify, images
from plumbing.atomic import SaveError

pytestmark = pytest.mark.quick

BATCH = 4
NAMES = ("blüte", "花")  # two and three bytes a character in UTF-8


def mean_colour_logits(batch):
    return 4 * batch.mean(axis=(2, 3))  # N x 3 x H x W -> N x 3: red daisy, green roses, blue tulips


@pytest.fixture
def stand_in_model(monkeypatch):
    def load_classifier(*args, **kwargs):
        return classify.Classifier(mean_colour_logits, list(CLASSES), images.Preprocessing(32, 32))

    monkeypatch.setattr(predict, "load_classifier", load_classifier)


@pytest.fixture
def photos(tmp_path, stand_in_model):
    """tmp_path/photos/{one,two}/<name>_NN.jpg, 6 each; the current folder is tmp_path."""
    for n, folder in enumerate(("one", "two")):
        for i in range(6):
            save_image(tmp_path / "photos" / folder / f"{NAMES[n]}_{i:02d}.jpg", COLORS[i % 3], seed=100 * n + i)
    return tmp_path / "photos"


def run_predict(*argv):
    return call(predict, [*argv, "--weights", "stand-in.pth", "--batch-size", BATCH, "--workers", 0])


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture
def reference(photos, tmp_path):
    path = tmp_path / "reference.csv"
    code, _, err = run_predict(photos, "--output", path)
    assert code == 0, err
    assert len(rows_of(path)) == 13
    return path


# ---------------------------------------------------------------------------------------------
# 3. a row torn by a kill, wherever the cut falls
# ---------------------------------------------------------------------------------------------
def test_a_row_torn_in_the_middle_of_a_multibyte_character_is_redone(reference, photos, tmp_path):
    lines = reference.read_bytes().splitlines(keepends=True)
    ninth = lines[9]
    cut = ninth.index("花".encode()) + 1  # one byte of the character's three
    output = tmp_path / "p.csv"
    output.write_bytes(b"".join(lines[:9]) + ninth[:cut])
    code, out, err = run_predict(photos, "--output", output)
    assert code == 0, err
    assert "8 of 12 photos are in" in out and "cut short" in out
    assert output.read_bytes() == reference.read_bytes()


def test_a_torn_last_row_is_dropped_whatever_byte_it_ends_in(tmp_path):
    """Every cut of the last row (a name with multi-byte characters and a quoted newline in it)."""
    path = tmp_path / "p.csv"
    header = classify.csv_header(CLASSES)
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    whole = classify._csv_text([header, *classify.csv_rows(["a/blüte.jpg", "b/花\nzwei ü.jpg"], ["a", "c"],
                                                             probabilities)]).encode("utf-8")
    last_row_starts = whole.index(b'"b/')
    for cut in range(last_row_starts + 1, len(whole)):
        path.write_bytes(whole[:cut])
        rows = classify.CsvOutput(str(path), CLASSES)
        rows.close()
        assert (len(rows.done), rows.torn) == (1, True), whole[:cut]
        assert path.read_bytes() == whole[:last_row_starts], whole[:cut]
    path.write_bytes(whole)
    rows = classify.CsvOutput(str(path), CLASSES)
    rows.close()
    assert (len(rows.done), rows.torn) == (2, False) and path.read_bytes() == whole


# ---------------------------------------------------------------------------------------------
# 4. the same photos, typed another way
# ---------------------------------------------------------------------------------------------
def test_the_same_folder_typed_another_way_adds_nothing(reference, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "p.csv"
    code, _, err = run_predict("photos", "--output", output)
    assert code == 0, err
    first = output.read_bytes()
    for spelling in ("./photos", str(photos), "photos/../photos/"):
        code, out, err = run_predict(spelling, "--output", output)
        assert code == 0, err
        assert f"12 of 12 photos are in {output} already" in out, spelling
        assert output.read_bytes() == first, spelling


def test_a_run_continued_under_another_spelling_adds_only_the_rest(reference, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "p.csv"
    code, _, err = run_predict(os.path.join("photos", "one"), "--output", output)
    assert code == 0, err
    code, out, err = run_predict(str(photos), "--output", output)
    assert code == 0, err
    assert f"6 of 12 photos are in {output} already (delete it to start over), 6 to go" in out
    files = [os.path.realpath(row[0]) for row in rows_of(output)[1:]]
    assert sorted(files) == sorted(os.path.realpath(row[0]) for row in rows_of(reference)[1:])


# ---------------------------------------------------------------------------------------------
# 2. a write that fails (a full disk)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failed_write_is_one_error_and_closing_adds_none(tmp_path):
    """The file's writes go to /dev/full after one batch, which fails every write with ENOSPC."""
    path = tmp_path / "p.csv"
    rows = classify.CsvOutput(str(path), CLASSES)
    rows.append(["a.jpg"], ["a"], np.array([[0.7, 0.2, 0.1]]))
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, rows.file.fileno())
    finally:
        os.close(full)
    with pytest.raises(SaveError) as caught:
        rows.append(["b.jpg", "c.jpg"], ["c", "b"], np.array([[0.1, 0.2, 0.7], [0.2, 0.7, 0.1]]))
    assert caught.value.errno == errno.ENOSPC
    rows.close()  # the failed write was reported once: closing raises nothing more
    assert rows.written == 1
    assert [row[0] for row in rows_of(path)[1:]] == ["a.jpg"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_one_message_with_the_row_counts_whoever_writes(photos, tmp_path, monkeypatch):
    """The disk fills after the first batch: predict.py's last line is CsvOutput's own message,
    which counts the photos in the file, not a second wording of it."""
    raised = []
    real_append = classify.CsvOutput.append

    def append(self, *args, **kwargs):
        if self.written:  # every write from the second batch on fails with ENOSPC
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, self.file.fileno())
            os.close(full)
        try:
            return real_append(self, *args, **kwargs)
        except SaveError as e:
            raised.append(e)
            raise

    monkeypatch.setattr(classify.CsvOutput, "append", append)
    output = tmp_path / "p.csv"
    code, _, err = run_predict(photos, "--output", output)
    (error,) = raised
    assert_clean_error(code, err, str(output), "4 of 12 photos are in it", "run the same command again")
    assert err.strip() == f"error: {error}"


# ---------------------------------------------------------------------------------------------
# 14. --sort-into inside the photos' folder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inside", ["sorted", "."], ids=["a-folder-in-it", "the-folder-itself"])
def test_sort_into_inside_the_photos_folder_is_refused(photos, tmp_path, inside):
    sort_into = os.path.normpath(photos / inside)
    before = sorted(photos.rglob("*"))
    code, out, err = run_predict(photos, "--output", tmp_path / "p.csv", "--sort-into", sort_into)
    assert_clean_error(code, err, f"--sort-into {sort_into}", str(photos), "outside")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(photos.rglob("*")) == before and not (tmp_path / "p.csv").exists()

    code, _, err = run_predict(photos, "--output", tmp_path / "q.csv")  # a later run sees the 12 photos
    assert code == 0, err
    assert len(rows_of(tmp_path / "q.csv")) == 13



def test_sort_into_inside_the_folder_of_photos_given_one_by_one_is_refused(photos, tmp_path):
    """predict.py photos/one/*.jpg --sort-into photos/one/sorted: the same trap as the folder given
    whole, since a later run over photos/one would read the links as photos."""
    files = sorted(str(p) for p in (photos / "one").iterdir())
    sort_into = str(photos / "one" / "sorted")
    before = sorted(photos.rglob("*"))
    code, out, err = run_predict(*files, "--output", tmp_path / "p.csv", "--sort-into", sort_into)
    assert_clean_error(code, err, f"--sort-into {sort_into}", str(photos / "one"), "outside")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert sorted(photos.rglob("*")) == before and not (tmp_path / "p.csv").exists()

    code, _, err = run_predict(photos / "one", "--output", tmp_path / "q.csv")  # a later run sees the 6 photos
    assert code == 0, err
    assert len(rows_of(tmp_path / "q.csv")) == 7

    code, out, err = run_predict(*files, "--sort-into", tmp_path / "sorted")  # outside their folder: sorted
    assert code == 0, err
    assert "6 photos sorted into" in out
