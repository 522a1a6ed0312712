"""The data review page (python app.py --review, data_set/review_page.py): in a real headless
Chromium driven by Playwright, a suspect relabelled with a key press and a copy excluded are in
DIR/review.csv and on the page after a reload, and a short training on the folder then counts
them; what the page computed is kept beside the run and used again while the files are the same;
photos go out downscaled, inline; the page leaves no files behind. Offline, 127.0.0.1 only."""
import base64
import errno
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
import train
from data_set import check, review, review_page
from helpers import (
    CLASSES,
    REPO,
    SMALL_RUN,
    PageServer,
    assert_clean_error,
    call,
    make_tree,
    needs,
    script_env,
    train_argv,
)
from inference import classify

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and os.path.exists(p)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def folder_and_run(small_run, tmp_path):
    """A copy of the small run's photos with an exact copy of one training photo added, and a run
    folder holding a copy of its best.pth (the page writes its cache beside the weights)."""
    data = tmp_path / "photos"
    shutil.copytree(small_run["data"], data)
    shutil.copy(data / "train" / "daisy" / "daisy_01.jpg", data / "train" / "daisy" / "daisy_01_again.jpg")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(small_run["best"], run / "best.pth")
    return data, run / "best.pth"


class ReviewServer(PageServer):
    """python app.py --review ... in its own process, until stop()."""

    up_s, stop_s = 300, 60

    def __init__(self, *args):
        super().__init__("--review", *args)

    @property
    def folder(self):
        found = re.search(r"the page's own files are in (\S+) until it stops", "".join(self.output))
        assert found, "".join(self.output)
        return Path(found.group(1))


def wait_for_text(locator, text):
    locator.get_by_text(text).first.wait_for(timeout=120_000)


@needs("gradio", why="the review page's: requirements-dev.txt")
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_key_press_relabels_a_suspect_and_another_excludes_a_copy_and_both_survive_a_reload(folder_and_run,
                                                                                              tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements-dev.txt)")
    data, weights = folder_and_run
    server = ReviewServer("--data-path", data, "--weights", weights, "--device", "cpu", "--amp", "off")
    folder = server.folder
    assert folder.is_dir()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            try:
                tab = browser.new_page(viewport={"width": 1100, "height": 900})
                tab.goto(server.url)
                item = tab.locator("#review-item")
                wait_for_text(item, "suspect labels: 1 of 13")
                suspect = item.locator("figure.current").get_attribute("data-name")
                given = suspect.split("/")[1]
                other = next(c for c in CLASSES if c != given)
                tab.keyboard.press(str(CLASSES.index(other) + 1))  # the digit of another class
                wait_for_text(item, "suspect labels: 2 of 13")

                tab.get_by_label("copies (2)").check()
                wait_for_text(item, "copies: 1 of 2")
                copy = item.locator("figure.current").get_attribute("data-name")
                assert {copy, item.locator("figure.other").get_attribute("data-name")} == {
                    "train/daisy/daisy_01.jpg", "train/daisy/daisy_01_again.jpg"}
                if copy == suspect:  # the suspect was one of the copies: exclude the other one
                    tab.keyboard.press("ArrowRight")
                    wait_for_text(item, "copies: 2 of 2")
                    copy = item.locator("figure.current").get_attribute("data-name")
                tab.keyboard.press("x")
                recent = tab.locator("#review-recent")
                wait_for_text(recent, copy)
                sources = item.locator("img").evaluate_all("images => images.map(i => i.getAttribute('src'))")
                assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)  # no path served

                tab.reload()
                wait_for_text(recent, copy)
                assert suspect in recent.inner_text() and other in recent.inner_text()
                tab.get_by_label("copies (2)").check()
                wait_for_text(item, "copies: 1 of 2")
                assert "decision: exclude" in item.locator(f'figure[data-name="{copy}"]').inner_text()
                tab.get_by_label("suspect labels (13)").check()
                wait_for_text(item, "suspect labels: 1 of 13")
                assert f"decision: relabelled to {other}" in item.locator("figure.current").inner_text()
                wait_for_text(tab.locator("#review-summary"), "1 excluded, 1 relabelled, 0 kept")
            finally:
                browser.close()
    finally:
        server.stop()
    output = "".join(server.output)
    assert not folder.exists() and "Traceback" not in output, output
    decisions = review.read(data)
    assert {name: (d.action, d.new_class) for name, d in decisions.items()} == {suspect: ("relabel", other),
                                                                                copy: ("exclude", "")}
    assert {p.name for p in data.iterdir()} == {"train", "val", "review.csv"}  # no photo moved, no file added

    # a short training on the folder counts the decisions: 13 training photos less the excluded copy
    code, out, err = call(train, train_argv(data, tmp_path / "out", *SMALL_RUN))
    assert code == 0, err
    assert "review.csv: 1 excluded, 1 relabelled" in out
    assert re.search(r"^data: .*; 12 train, 6 val images", out, re.M), out


@needs("gradio", why="the review page's: requirements-dev.txt")
def test_what_the_page_computed_is_used_again_until_a_file_changes(folder_and_run, monkeypatch):
    data, weights = folder_and_run
    first = review_page.compute_review_data(str(data), str(weights), "unused", device="cpu", amp="off",
                                            log=lambda line: None)
    assert (weights.parent / review_page.CACHE).is_file()
    assert len(first.lists["suspects"]) == 13 and len(first.lists["duplicates"]) == 2
    classified = []
    real_predict = classify.predict

    def predict(classifier, files, *args, **kwargs):
        classified.extend(files)
        return real_predict(classifier, files, *args, **kwargs)

    monkeypatch.setattr(classify, "predict", predict)
    again = review_page.compute_review_data(str(data), str(weights), "unused", device="cpu", amp="off",
                                            log=lambda line: None)
    assert classified == []  # nothing classified again
    np.testing.assert_allclose(again.probabilities, first.probabilities, atol=1e-6)
    assert [p.near for p in again.photos] == [p.near for p in first.photos]

    changed = data / "val" / "roses" / "roses_00.jpg"
    Image.new("RGB", (64, 48), (40, 200, 60)).save(changed)  # another picture under the same name
    review_page.compute_review_data(str(data), str(weights), "unused", device="cpu", amp="off",
                                    log=lambda line: None)
    assert classified == [str(changed)]


@needs("gradio", why="the review page's: requirements-dev.txt")
@pytest.mark.quick
def test_photos_are_sent_downscaled(tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(big)
    url = review_page.preview(str(big), review_page.PHOTO_SIDE)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as sent:
        assert sent.size == (640, 480) and sent.format == "JPEG"


def test_the_page_refuses_weights_of_other_classes_and_a_missing_folder_in_one_line(small_run, tmp_path):
    other = tmp_path / "other"
    for name in ("cats", "dogs"):
        shutil.copytree(small_run["data"] / "train" / "daisy", other / name)
    mistakes = {(): "--review needs --data-path DIR",
                ("--data-path", other, "--weights", small_run["best"]): "knows the classes daisy, roses, tulips",
                ("--data-path", tmp_path / "nowhere"): "does not exist"}
    for argv, words in mistakes.items():
        proc = subprocess.run([sys.executable, str(REPO / "app.py"), "--review", *map(str, argv)], cwd=REPO,
                              env=script_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error:") and words in proc.stderr, proc.stderr


@needs("gradio", why="the review page's: requirements-dev.txt")
def test_the_suspects_come_in_the_order_of_the_runs_suspect_labels_csv(small_run, tmp_path):
    import csv

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(small_run["best"], run / "best.pth")
    # the run's rows the other way round: an order the page cannot have computed from these weights
    header, *rows = (small_run["out"] / "suspect_labels.csv").read_text().splitlines()
    (run / "suspect_labels.csv").write_text("\n".join([header, *rows[::-1]]) + "\n")
    with open(run / "suspect_labels.csv", newline="") as f:
        expected = [review.relative(row["file"], str(small_run["data"])) for row in csv.DictReader(f)]
    d = review_page.compute_review_data(str(small_run["data"]), str(run / "best.pth"), "unused", device="cpu",
                                        amp="off", log=lambda line: None)
    assert [d.names[item.photos[0]] for item in d.lists["suspects"]] == expected and len(expected) == 12


# ---------------------------------------------------------------------------------------------
# Without a trained run: a folder with one exact copy, an untrained checkpoint
# ---------------------------------------------------------------------------------------------
NO_WEIGHTS = "no-such-run/best.pth"  # stands for app.py's default --weights, missing


@pytest.fixture(autouse=True)
def own_cache_folder(tmp_path, monkeypatch):
    """The page's cache without weights goes to the user's cache folder: the test's own, here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


@pytest.fixture
def copied(tmp_path):
    """A generated tree (3 classes, 4 train and 2 val photos each) with an exact copy of one training photo."""
    data = make_tree(tmp_path / "photos")
    shutil.copy(data / "train" / "daisy" / "daisy_01.jpg", data / "train" / "daisy" / "daisy_01_again.jpg")
    return data


@needs("gradio", why="the review page's: requirements-dev.txt")
@pytest.mark.quick
def test_a_folder_where_no_decision_can_be_written_is_refused_at_start(copied, tmp_path, monkeypatch):
    """review.csv a link into a folder that is not there: every decision would fail, so the page
    does not start; one line names the file and says to pass a writable copy."""
    (copied / "review.csv").symlink_to(tmp_path / "gone" / "review.csv")

    def build_review_page(d):
        raise AssertionError("the page was about to be served")

    monkeypatch.setattr(review_page, "build_review_page", build_review_page)
    monkeypatch.chdir(tmp_path)  # no weights/best.pth here: the page without a model
    code, out, err = call(app, ["--review", "--data-path", copied])
    assert_clean_error(code, err, f"cannot write {copied / 'review.csv'}", "writable copy")
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "gone").exists()


@needs("gradio", why="the review page's: requirements-dev.txt")
@pytest.mark.parametrize("failure", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])
def test_a_decision_that_cannot_be_written_is_a_message_on_the_page_and_one_log_line(copied, monkeypatch, capsys,
                                                                                     failure):
    import gradio as gr

    d = review_page.compute_review_data(str(copied), NO_WEIGHTS, NO_WEIGHTS, log=lambda line: None)
    page = review_page.Page(d)
    capsys.readouterr()
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):  # the folder turned read-only, or full, while the page ran
        if os.path.basename(path) == review.FILE:
            raise OSError(failure, os.strerror(failure), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(gr.Error) as caught:
        page.decide("duplicates", 0, "exclude")
    assert caught.value.print_exception is False  # no traceback in the server's log
    assert str(copied / "review.csv") in caught.value.message and os.strerror(failure) in caught.value.message
    out, err = capsys.readouterr()
    (line,) = (out + err).strip().splitlines()
    assert str(copied / "review.csv") in line and os.strerror(failure) in line
    assert not (copied / "review.csv").exists()


@pytest.mark.quick
def test_without_weights_the_hashes_are_kept_for_the_next_start(copied, own_cache_folder, monkeypatch):
    hashed = []
    real_hash = check._hash_photo

    def hash_photo(photo, with_digest):
        hashed.append(photo.path)
        return real_hash(photo, with_digest)

    monkeypatch.setattr(check, "_hash_photo", hash_photo)
    first = review_page.compute_review_data(str(copied), NO_WEIGHTS, NO_WEIGHTS, log=lambda line: None)
    assert len(hashed) == 19 and len(first.lists["duplicates"]) == 2
    assert len(list(own_cache_folder.rglob("*.json"))) == 1 and not list(copied.rglob("*.json"))
    hashed.clear()
    again = review_page.compute_review_data(str(copied), NO_WEIGHTS, NO_WEIGHTS, log=lambda line: None)
    assert hashed == []  # nothing decoded again
    assert [(p.near, p.width, p.digest) for p in again.photos] == [(p.near, p.width, p.digest) for p in first.photos]
    assert len(again.lists["duplicates"]) == 2

    changed = copied / "val" / "roses" / "roses_00.jpg"
    Image.new("RGB", (64, 48), (40, 200, 60)).save(changed)  # another picture under the same name
    review_page.compute_review_data(str(copied), NO_WEIGHTS, NO_WEIGHTS, log=lambda line: None)
    assert hashed == [str(changed)]


@pytest.fixture
def untrained(tmp_path):
    """tmp_path/run/best.pth: an untrained 3-class GoogLeNet at 32 px (nothing is trained in the quick tier)."""
    import torch

    from inference import checkpoint as ckpt
    from inference import images
    from model import GoogLeNet

    torch.manual_seed(0)
    model = GoogLeNet(num_classes=len(CLASSES), aux_logits=True, init_weights=True, variant="torchvision")
    record = ckpt.Record(list(CLASSES), "torchvision", (32, 32), images.Preprocessing(32, 32), None, {})
    (tmp_path / "run").mkdir()
    ckpt.save_checkpoint(record.describe(model), str(tmp_path / "run" / "best.pth"))
    return tmp_path / "run" / "best.pth"


@pytest.mark.quick
def test_the_weights_are_read_once_and_min_confidence_is_the_not_sure_threshold(copied, untrained, monkeypatch):
    from inference import checkpoint as ckpt

    reads = []
    real_load = ckpt.load_checkpoint

    def load_checkpoint(path, *args, **kwargs):
        reads.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "load_checkpoint", load_checkpoint)
    weights = str(untrained)
    every = review_page.compute_review_data(str(copied), weights, NO_WEIGHTS, "cpu", "off", min_confidence=1.0,
                                            log=lambda line: None)
    assert reads == [weights]
    train = sum(p.part == "train" for p in every.photos)
    assert len(every.lists["not sure"]) == train == 13  # below a probability of 1: every training photo
    none = review_page.compute_review_data(str(copied), weights, NO_WEIGHTS, "cpu", "off", min_confidence=0.0,
                                           log=lambda line: None)
    assert none.lists["not sure"] == []


@pytest.mark.quick
def test_the_not_sure_list_follows_the_weights_own_score_and_its_cache(copied, untrained):
    """Weights that decide "not sure" by the energy score (train.py's default) list the training
    photos whose energy is below their threshold, by that score and not by the top probability,
    and a second start takes the scores from the cache."""
    from inference import checkpoint as ckpt

    def start(threshold):
        loaded = ckpt.load_checkpoint(str(untrained))
        ckpt.save_checkpoint(dict(loaded, temperature=1.0, min_confidence=threshold, not_sure_score="energy"),
                             str(untrained))
        return review_page.compute_review_data(str(copied), str(untrained), NO_WEIGHTS, "cpu", "off",
                                               log=lambda line: None)

    first = start(0.0)
    train = [i for i, p in enumerate(first.photos) if p.part == "train"]
    classifier = classify.load_classifier(str(untrained), device="cpu", amp="off")
    _, _, energies = classify.predict(classifier, [first.photos[i].path for i in train], 8, 0, sureness=True)
    np.testing.assert_allclose(first.sureness[train], energies, rtol=1e-5)
    threshold = float(np.median(energies))
    d = start(threshold)  # new weights: scored again
    below = sorted((i for i, e in zip(train, energies) if e < threshold), key=lambda i: first.sureness[i])
    assert below and [item.photos[0] for item in d.lists["not sure"]] == below
    assert all(item.why.startswith("energy score ") and "top probability" in item.why for item in d.lists["not sure"])
    logged = []
    again = review_page.compute_review_data(str(copied), str(untrained), NO_WEIGHTS, "cpu", "off", log=logged.append)
    assert not any(line.startswith("classifying") for line in logged)  # from the cache
    np.testing.assert_array_equal(again.sureness, d.sureness)
    assert again.lists["not sure"] == d.lists["not sure"]


# ---------------------------------------------------------------------------------------------
# Options the page would not use: refused, not ignored
# ---------------------------------------------------------------------------------------------
IGNORED = {
    ("--data-path", "photos"): ("--data-path", "--review"),
    ("--review", "--data-path", "photos", "--examples", "examples"): ("--examples",),
    ("--review", "--data-path", "photos", "--max-upload-mb", "5"): ("--max-upload-mb",),
    ("--review", "--data-path", "photos", "--cam-layer", "inception4e"): ("--cam-layer",),
    ("--review", "--data-path", "photos", "--examples", "examples", "--cam-layer", "inception5b"): (
        "--examples", "--cam-layer"),
}


@pytest.mark.quick
@pytest.mark.parametrize("argv", sorted(IGNORED), ids=" ".join)
def test_an_option_the_page_would_ignore_is_refused_in_one_line(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # photos/ and examples/ are not there: nothing may get as far as reading them
    code, out, err = call(app, list(argv))
    assert_clean_error(code, err, *IGNORED[argv])
    assert code == 2 and len(err.strip().splitlines()) == 1 and out == "", (out, err)


@pytest.mark.quick
def test_a_default_value_typed_out_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = call(app, ["--review", "--data-path", "photos", "--max-upload-mb", "20"])
    assert_clean_error(code, err, "--max-upload-mb")


@pytest.mark.quick
def test_class_indices_names_the_classes_of_a_plain_state_dict_on_the_review_page(copied, untrained, tmp_path,
                                                                                  monkeypatch):
    """--class-indices is the page's option too, as it is the classify page's: weights that are a
    plain state dict take their class names from it (here: names that are not the folder's)."""
    import torch

    plain = tmp_path / "plain.pth"
    torch.save(torch.load(untrained, map_location="cpu", weights_only=True)["model"], plain)
    (tmp_path / "names.json").write_text('{"0": "cats", "1": "dogs", "2": "owls"}')
    monkeypatch.chdir(tmp_path)  # and no class_indices.json here
    code, _, err = call(app, ["--review", "--data-path", copied, "--weights", plain, "--class-indices", "names.json",
                              "--device", "cpu", "--amp", "off"])
    assert_clean_error(code, err, "knows the classes cats, dogs, owls")
