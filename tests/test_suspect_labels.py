"""Suspect labels: train.py ranks the training photos by how unlikely their given label is
(OUTPUT_DIR/suspect_labels.csv) and report.py draws the first ones (suspect_labels.png)."""
import csv

import numpy as np
import pytest
from PIL import Image

import report
import train
from helpers import call, pixels, train_argv
from training import labels

COLOURS = {"blue": (50, 70, 230), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_colours(root, n_train=12, n_val=3, size=(48, 48)):
    """root/{train,val}/<colour>/ of noisy photos of that colour, and one red square on black filed
    under blue in train: (root, the mislabeled photo)."""
    seed = 0
    for part, n in (("train", n_train), ("val", n_val)):
        for name, colour in COLOURS.items():
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pixels(colour, seed, size)).save(root / part / name / f"{name}_{i:02d}.png")
                seed += 1
    square = np.zeros((size[1], size[0], 3), np.uint8)
    square[4:-4, 4:-4] = COLOURS["red"]
    wrong = root / "train" / "blue" / "red_square.png"
    Image.fromarray(square).save(wrong)
    return root, wrong


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A 3-epoch run at 48 px on the colours (no colour augmentation; the EMA's decay warms up, so it
    follows the weights of so short a run): (data, out, the mislabeled photo, stdout)."""
    tmp = tmp_path_factory.mktemp("suspects")
    root, wrong = make_colours(tmp / "data")
    out = tmp / "out"
    code, stdout, stderr = call(train, train_argv(root, out, "--image-size", 48, "--auto-augment", "none",
                                                  "--warmup-epochs", 0, epochs=3, batch_size=8))
    assert code == 0, stderr
    return root, out, wrong, stdout


def read_suspects(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == labels.SUSPECT_FIELDS
    return [(file, given, suggested, float(score)) for file, given, suggested, score in rows[1:]]


def test_the_mislabeled_photo_comes_first(colour_run):
    root, out, wrong, stdout = colour_run

    rows = read_suspects(out / "suspect_labels.csv")

    assert len(rows) == 3 * 12 + 1  # every training photo, once
    assert sorted(file for file, _, _, _ in rows) == sorted(str(p) for p in (root / "train").rglob("*.png"))
    assert rows[0][:3] == (str(wrong), "blue", "red")
    assert rows[0][3] > 0.5 and rows[0][3] > rows[1][3]
    assert [score for *_, score in rows] == sorted((score for *_, score in rows), reverse=True)
    line = next(line for line in stdout.splitlines() if line.startswith("suspect labels:"))
    assert line.endswith(f"are in {out / 'suspect_labels.csv'} (python report.py {out} draws the first ones)")
    assert "leakage" not in stdout  # no val photo copies a training one


def test_report_draws_the_first_suspects_with_both_names(colour_run):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, out, _, _ = colour_run
    rows = read_suspects(out / "suspect_labels.csv")

    fig = report.draw_suspect_labels(plt, str(out / "suspect_labels.csv"), 6)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    plt.close(fig)
    written = report.plot(str(out), top_losses=0, suspect_labels=6)

    assert titles == [f"given {given}\nsuggested {suggested}\nscore {score:.2f}"
                      for _, given, suggested, score in rows[:6]]
    assert titles[0].startswith("given blue\nsuggested red\n")
    assert str(out / "suspect_labels.png") in written
    with Image.open(out / "suspect_labels.png") as png:
        assert png.format == "PNG" and png.width > png.height  # 6 photos: a row of 4 over a row of 2


def test_the_score_is_one_minus_the_given_class_probability_and_ties_go_by_file():
    samples = [("c.jpg", 0), ("a.jpg", 1), ("b.jpg", 1), ("d.jpg", 2)]
    probabilities = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8]])

    ranked = labels.ranked_suspects(samples, ["x", "y", "z"], np.array([0, 1, 2, 3]), probabilities)

    assert [(f, g, s, round(score, 6)) for f, g, s, score in ranked] == [
        ("a.jpg", "y", "x", 0.8), ("b.jpg", "y", "z", 0.8), ("d.jpg", "z", "z", 0.2), ("c.jpg", "x", "x", 0.1)]
