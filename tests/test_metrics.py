"""training/metrics.py: the scores (accuracy, balanced accuracy, macro-F1, per class) by hand,
metrics.csv (its format, a resumed run's rows) and the epoch's line, and --best-metric."""
import csv
import os
import re
from types import SimpleNamespace

import pytest
import torch

import train
from helpers import call, load, make_tree, train_argv
from inference.calibration import Calibration
from training import evaluation, metrics, step


# ---------------------------------------------------------------------------------------------
# the scores
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_balanced_accuracy_and_macro_f1_by_hand():
    confusion = torch.tensor([[8, 2, 0], [1, 1, 0], [0, 0, 0]])  # a class with no images and no predictions
    scores = metrics.summary_scores(confusion)
    assert scores["accuracy"] == pytest.approx(9 / 12)
    assert scores["balanced_accuracy"] == pytest.approx((8 / 10 + 1 / 2) / 2)
    f1_a, f1_b = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)
    assert scores["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


@pytest.mark.quick
def test_per_class_scores_by_hand():
    confusion = torch.tensor([[5, 1, 0],
                              [2, 3, 1],
                              [0, 0, 4]])
    # 16 images. class 0: TP 5, predicted 7, true 6, wrong one-vs-rest 2 + 1 -> accuracy 13/16
    #            class 1: TP 3, predicted 4, true 6, wrong 1 + 3 -> 12/16
    #            class 2: TP 4, predicted 5, true 4, wrong 1 + 0 -> 15/16
    expected = [(5 / 7, 5 / 6, 13 / 16, 6), (3 / 4, 3 / 6, 12 / 16, 6), (4 / 5, 4 / 4, 15 / 16, 4)]
    got = metrics.per_class_scores(confusion)
    assert len(got) == 3
    for (p, r, a, n), (ep, er, ea, en) in zip(got, expected):
        assert (p, r, a) == pytest.approx((ep, er, ea), abs=1e-12) and n == en


@pytest.mark.quick
def test_per_class_scores_never_divide_by_zero():
    # class 1 is never predicted (precision 0); class 2 has no images (recall 0)
    got = metrics.per_class_scores(torch.tensor([[2, 0, 0], [1, 0, 0], [0, 0, 0]]))
    assert got == [(2 / 3, 1.0, 2 / 3, 2), (0.0, 0.0, 2 / 3, 1), (0.0, 0.0, 1.0, 0)]
    assert metrics.per_class_scores(torch.zeros(2, 2, dtype=torch.int64)) == [(0.0, 0.0, 0.0, 0)] * 2


# ---------------------------------------------------------------------------------------------
# metrics.csv and the epoch's line
# ---------------------------------------------------------------------------------------------
def read_metrics(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.quick
def test_append_metrics_rows_and_format(tmp_path):
    path = str(tmp_path / "metrics.csv")
    for epoch in (1, 2, 3):
        metrics.append_metrics(path, epoch, dict(lr=3e-4, train_loss=1.0 / epoch, train_accuracy="",
                                                 val_loss=2.0 / 3, val_accuracy=epoch / 9, val_balanced_accuracy=0.25,
                                                 val_macro_f1=0.2, images_per_s=12.5, seconds=7.0))
    fields, rows = read_metrics(path)
    assert fields == metrics.METRIC_FIELDS
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[2] == {"epoch": "3", "lr": "0.0003", "train_loss": "0.333333", "train_accuracy": "",
                       "val_loss": "0.666667", "val_accuracy": "0.333333", "val_balanced_accuracy": "0.25",
                       "val_macro_f1": "0.2", "images_per_s": "12.5", "seconds": "7"}
    text = (tmp_path / "metrics.csv").read_text()
    assert text.count("\n") == 4 and "\r" not in text
    assert os.listdir(tmp_path) == ["metrics.csv"]


@pytest.mark.quick
def test_append_metrics_for_an_existing_epoch_replaces_it_and_drops_later_ones(tmp_path):
    """A run resumed from epoch 2's last.pth rewrites epoch 2; epochs 3-4 of the lost run go."""
    path = str(tmp_path / "metrics.csv")
    for epoch in (1, 2, 3, 4):
        metrics.append_metrics(path, epoch, dict(lr=0.1, val_accuracy=0.1 * epoch))
    metrics.append_metrics(path, 2, dict(lr=0.05, val_accuracy=0.9))
    _, rows = read_metrics(path)
    assert [(r["epoch"], r["lr"], r["val_accuracy"]) for r in rows] == [("1", "0.1", "0.1"), ("2", "0.05", "0.9")]
    metrics.append_metrics(path, 3, dict(lr=0.01, val_accuracy=0.95))
    _, rows = read_metrics(path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


@pytest.mark.quick
@pytest.mark.parametrize("accuracy", [0.75, None], ids=["classes", "mixed-targets"])
def test_an_epoch_without_a_training_accuracy_leaves_it_out(accuracy, tmp_path, capsys):
    """With MixUp or CutMix the targets are mixtures, not classes: no training accuracy is printed
    or written (train_one_epoch's result has None; test_training_step.py checks that part)."""
    run = SimpleNamespace(args=SimpleNamespace(best_metric="accuracy", output_dir=str(tmp_path)), tensorboard=None)
    confusion = torch.tensor([[2, 1], [0, 3]])
    val = evaluation.Evaluation(0.5, metrics.summary_scores(confusion), confusion)
    metrics.report_epoch(run, 1, 1e-3, step.EpochResult(1.25, accuracy, 30.0), val, 4.0)
    line = capsys.readouterr().out
    assert line.startswith("[epoch 1] train_loss: 1.250  ")
    assert ("train_accuracy" in line) == (accuracy is not None)
    assert accuracy is None or "train_accuracy: 0.750  " in line
    assert "val_loss: 0.500  val_accuracy: 0.833" in line
    _, (row,) = read_metrics(tmp_path / "metrics.csv")
    assert row["train_accuracy"] == ("0.75" if accuracy else "")


def test_a_run_writes_a_row_and_a_line_per_epoch_and_names_the_best(small_run):
    fields, rows = read_metrics(small_run["out"] / "metrics.csv")
    assert fields == metrics.METRIC_FIELDS
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert 0.0 <= float(rows[0]["train_accuracy"]) <= 1.0 and 0.0 <= float(rows[0]["val_accuracy"]) <= 1.0
    assert float(rows[0]["lr"]) == pytest.approx(1e-3 / 4)  # the first epoch of the 3-epoch warm-up
    stdout = small_run["stdout"]
    printed = re.search(r"\[epoch 1\] train_loss: ([\d.]+)  train_accuracy: [\d.]+ .*val_accuracy: ([\d.]+)", stdout)
    assert printed, stdout[-2000:]
    assert printed.group(1) == f"{float(rows[0]['train_loss']):.3f}"
    assert printed.group(2) == f"{float(rows[0]['val_accuracy']):.3f}"
    assert re.search(r"^best val_accuracy [\d.]+ at epoch 1, saved in .*best\.pth", stdout, re.M)


def test_best_metric_chooses_what_best_pth_keeps(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=2, n_val=2)
    out = tmp_path / "run"
    code, stdout, err = call(train, train_argv(tree, out, "--image-size", 32, "--best-metric", "macro_f1",
                                               "--no-model-ema", "--warmup-epochs", 0, epochs=3))
    assert code == 0, err
    _, rows = read_metrics(out / "metrics.csv")
    scores = [float(r["val_macro_f1"]) for r in rows]
    best = load(out / "best.pth")
    assert best["epoch"] == 1 + scores.index(max(scores))
    assert best["val_scores"]["macro_f1"] == pytest.approx(max(scores), abs=1e-5)
    assert f"best val_macro_f1 {max(scores):.3f} at epoch {best['epoch']}" in stdout


def top(probabilities):
    """The scores print_unknowns takes, of top probabilities alone."""
    return {"max_probability": probabilities}


@pytest.mark.quick
def test_the_unknowns_report_gives_the_90_percent_row_only_when_it_refuses_a_test_image(capsys):
    unknown = [0.2, 0.3, 0.9]
    metrics.print_unknowns(top([0.5, 0.6, 0.7, 0.8, 0.95]), top(unknown), Calibration(1.0, 0.55), "others")
    out = capsys.readouterr().out
    assert "AUROC 0.7333" in out  # 11 of the 15 pairs ranked right: all 5 above 0.2 and 0.3, one above 0.9
    assert "at the \"not sure\" threshold (0.5500): 66.7% of the unknowns caught (answered unknown), 80.0% of the " \
           "known answered" in out
    assert "5 test images are too few for a threshold that answers 90% of them" in out
    assert "at 90%" not in out
    known = [0.4 + 0.03 * i for i in range(20)]  # 2 of 20 refused: the threshold lies between 0.43 and 0.46
    metrics.print_unknowns(top(known), top(unknown), Calibration(1.0, 0.0), "others")
    out = capsys.readouterr().out
    assert "no \"not sure\" threshold in these weights" in out
    assert "at 90% of the known answered (0.4450): 66.7% of the unknowns caught (answered unknown), 90.0% of the " \
           "known answered" in out
