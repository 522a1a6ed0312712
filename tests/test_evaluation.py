"""train.py --eval-only (training/evaluation.py) on the session's small run: the report, the
confusion matrix and the per-image predictions agree with each other; the evaluation sizes come from
the weights unless given; --tta and --compile evaluate what they should; mistakes fail before any
image is decoded."""
import csv
import math
import os
import re

import pytest
import torch

import train
from helpers import CLASSES, assert_clean_error, call, eval_argv
from inference import checkpoint as ckpt
from inference import images
from plumbing.options import UserError
from training import data, metrics

CPU = torch.device("cpu")
VAL_PER_CLASS = 2  # the small run's val images per class


def lines(text):
    """Output lines, with tqdm's carriage-return redraws split off."""
    return [line for chunk in text.splitlines() for line in chunk.split("\r")]


def test_the_report_the_confusion_matrix_and_the_predictions_agree(small_run, tmp_path):
    eval_dir = tmp_path / "eval"
    code, out, err = call(train, eval_argv(small_run["best"], small_run["data"], eval_dir, "--batch-size", "4"))
    assert code == 0, out + err
    text = lines(out)
    overall = [re.fullmatch(r"accuracy: (\d\.\d{4}) \((\d+)/(\d+)\)  loss: \d+\.\d{4}  balanced accuracy: \d\.\d{4}  "
                            r"macro-F1: \d\.\d{4}", line) for line in text]
    overall = [m for m in overall if m]
    assert len(overall) == 1, out
    correct, total = int(overall[0].group(2)), int(overall[0].group(3))
    assert total == VAL_PER_CLASS * len(CLASSES) and overall[0].group(1) == f"{correct / total:.4f}"

    header = text.index("class   precision  recall  accuracy  images")
    table = [line.split() for line in text[header + 1: header + 1 + len(CLASSES)]]
    assert [r[0] for r in table] == list(CLASSES)
    assert [int(r[4]) for r in table] == [VAL_PER_CLASS] * len(CLASSES)

    start = text.index("confusion matrix (rows: true class, columns: predicted):")
    assert text[start + 1].split() == list(CLASSES)
    printed = [[int(v) for v in line.split()[1:]] for line in text[start + 2: start + 2 + len(CLASSES)]]

    with open(eval_dir / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", *CLASSES]
    assert [r[0] for r in rows[1:]] == list(CLASSES)
    cells = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert cells == printed
    assert [sum(r) for r in cells] == [VAL_PER_CLASS] * len(CLASSES)
    assert sum(cells[i][i] for i in range(len(CLASSES))) == correct
    # the per-class table agrees with the matrix
    for row, (p, r, a, n) in zip(table, metrics.per_class_scores(torch.tensor(cells))):
        assert row[1:] == [f"{p:.4f}", f"{r:.4f}", f"{a:.4f}", str(n)]
    # predictions.csv: one row per val image, in the val folder's order, agreeing with the matrix
    with open(eval_dir / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert list(predictions[0]) == ["file", "true_class", "predicted_class", "loss"] + [f"p_{c}" for c in CLASSES]
    assert [r["file"] for r in predictions] == sorted(str(p) for p in (small_run["data"] / "val").rglob("*.jpg"))
    assert all(os.path.basename(os.path.dirname(r["file"])) == r["true_class"] for r in predictions)
    counted = [[0] * len(CLASSES) for _ in CLASSES]
    for r in predictions:
        probabilities = [float(r[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert r["predicted_class"] == CLASSES[probabilities.index(max(probabilities))]
        assert float(r["loss"]) == pytest.approx(-math.log(float(r[f"p_{r['true_class']}"])), abs=1e-4)
        counted[CLASSES.index(r["true_class"])][CLASSES.index(r["predicted_class"])] += 1
    assert counted == cells
    assert sorted(os.listdir(eval_dir)) == ["confusion_matrix.csv", "predictions.csv"]


def test_the_evaluation_sizes_are_the_weights_unless_given(small_run, tmp_path):
    code, stdout, err = call(train, eval_argv(small_run["best"], small_run["data"], tmp_path / "ev"))
    assert code == 0, err
    assert "evaluation at 60 px" in stdout  # recorded in best.pth
    code, stdout, err = call(train, eval_argv(small_run["best"], small_run["data"], tmp_path / "ev", "--val-crop", 48))
    assert code == 0, err
    assert "evaluation at 48 px" in stdout
    code, _, err = call(train, eval_argv(small_run["best"], small_run["data"], tmp_path / "ev", "--val-resize", 56))
    assert_clean_error(code, err, "--val-resize 56 is smaller than the evaluation crop 60", "recorded in")


@pytest.mark.quick
def test_training_evaluates_at_one_and_a_quarter_times_the_last_crop():
    """Random crops show objects larger than a whole image does (README's recipe: 128 px crops,
    evaluation at 160)."""
    args = train.get_args_parser().parse_args([])
    assert args.image_size == (128, 128) and train.evaluation_sizes(args) == images.Preprocessing(160, 160)
    args = train.get_args_parser().parse_args(["--image-size", "96:160", "--val-resize", "256"])
    assert train.evaluation_sizes(args) == images.Preprocessing(256, 200)
    args = train.get_args_parser().parse_args(["--image-size", "48", "--val-resize", "48"])
    with pytest.raises(UserError, match="--val-resize 48 is smaller than the evaluation crop 60"):
        train.evaluation_sizes(args)


def test_tta_evaluates_the_mean_of_each_photo_and_its_mirror(small_run, tmp_path):
    code, stdout, err = call(train, eval_argv(small_run["best"], small_run["data"], tmp_path / "ev", "--tta"))
    assert code == 0, err
    with open(tmp_path / "ev" / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    model, classes, preprocessing = ckpt.load_model(str(small_run["best"]), "unused.json", CPU)
    x = data.normalize_batch(data.EvalTransform(preprocessing)(images.load_image(row["file"]))[None],
                             channels_last=True)
    with torch.inference_mode():
        expected = torch.softmax((model(x) + model(x.flip(3))) / 2, 1)[0]
    assert [float(row[f"p_{c}"]) for c in classes] == pytest.approx(expected.tolist(), abs=1e-5)


def test_compile_evaluates_through_what_torch_compile_returns(small_run, tmp_path, monkeypatch):
    """--compile hands the model to torch.compile once and evaluates through what it returns; the
    compiler itself is PyTorch's (and minutes on a CPU), so a stand-in that runs the model counts
    the calls."""
    compiled, calls = [], []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            calls.append(len(x))
            return self.model(x)

    def recording_compile(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return Compiled(model)

    monkeypatch.setattr(torch, "compile", recording_compile)
    reports = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        code, out, err = call(train, eval_argv(small_run["best"], small_run["data"], tmp_path / name, *extra))
        assert code == 0, err
        reports[name] = (tmp_path / name / "predictions.csv").read_text()
    assert compiled == ["GoogLeNet"]  # by the --compile run only
    assert sum(calls) == VAL_PER_CLASS * len(CLASSES)  # every val image went through the compiled module
    assert reports["compiled"] == reports["eager"]


@pytest.mark.quick
def test_missing_weights_fail_before_any_image_is_decoded(tmp_path):
    missing = tmp_path / "nope.pth"
    code, out, err = call(train, eval_argv(missing, tmp_path / "data", tmp_path / "eval"))
    assert_clean_error(code, err, str(missing), "does not exist")
    assert "cache:" not in out and "data:" not in out
    code, _, err = call(train, ["--eval-only", "--data-path", tmp_path / "data"])
    assert_clean_error(code, err, "--eval-only needs --weights")
