"""Transfer learning, proven offline, and the evaluation report.

A torchvision GoogLeNet built here (random weights, same layout as the ImageNet file) stands in for
the ImageNet weights: it must load through our code path and compute the same logits, fine-tune on
3 classes from the command line (train.run / predict.run, in this process: importing torch again
in a subprocess costs seconds), freeze what --freeze-layers freezes, and fail cleanly on the wrong
file or without a network. Then --eval-only's report and metrics.per_class_scores by hand.
Offline, CPU only.
"""
import csv
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torchvision

import predict
import train
from helpers import FP32, call, make_tree, train_argv
from inference import checkpoint
from model import GoogLeNet
from training import metrics

CLASSES = ["daisy", "roses", "tulips"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 3
VAL_IMAGES = len(CLASSES) * VAL_PER_CLASS
HEADS = ("fc.", "aux1.", "aux2.")  # what --freeze-layers leaves trainable


def lines(text):
    """Output lines, with tqdm's carriage-return redraws split off."""
    return [l for chunk in text.splitlines() for l in chunk.split("\r")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tree(tmp_path_factory.mktemp("flowers"), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS))


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=False)
    return model.eval()


@pytest.fixture(scope="module")
def tv_file(tv_model, tmp_path_factory):
    """torchvision's GoogLeNet state dict, as the ImageNet file holds it (1000 classes, aux heads)."""
    path = str(tmp_path_factory.mktemp("tv") / "googlenet-torchvision.pth")
    torch.save(tv_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def finetuned(tiny, tv_file, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("finetuned"))
    code, out, err = call(train, train_argv(tiny, out_dir, "--weights", tv_file))
    return {"code": code, "out": out, "err": err, "dir": out_dir, "best": os.path.join(out_dir, "best.pth")}


def require_ok(run):
    assert run["code"] == 0, f"exit {run['code']}\n{run['out'][-4000:]}\n{run['err'][-4000:]}"


# ---------------------------------------------------------------------------------------------
# our loader on a torchvision file
# ---------------------------------------------------------------------------------------------
def test_torchvision_file_loads_through_our_code_and_gives_the_same_logits(tv_model, tv_file):
    state_dict = checkpoint.load_checkpoint(tv_file)["model"]
    ours = GoogLeNet(num_classes=1000, aux_logits=True, variant="torchvision")
    assert checkpoint.load_weights(ours, state_dict, tv_file) == []
    ours.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = tv_model(x), ours(x)
    assert got.shape == (2, 1000)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


def test_reinit_heads_replaces_exactly_the_class_layers(tv_file):
    state_dict = checkpoint.load_checkpoint(tv_file)["model"]
    model = GoogLeNet(num_classes=3, variant="torchvision")
    assert checkpoint.load_weights(model, state_dict, tv_file, reinit_heads=True) == ["aux1.fc2", "aux2.fc2", "fc"]
    own = model.state_dict()
    assert set(own) == set(state_dict)
    for key, value in own.items():
        if key.startswith(("fc.", "aux1.fc2.", "aux2.fc2.")):
            assert value.shape[0] == 3, key
        else:
            assert torch.equal(value, state_dict[key]), key


def test_without_reinit_heads_a_1000_class_file_is_an_error_naming_fc(tv_file):
    state_dict = checkpoint.load_checkpoint(tv_file)["model"]
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_weights(GoogLeNet(num_classes=3, variant="torchvision"), state_dict, tv_file)
    message = str(info.value)
    assert "fc.weight (1000, 1024) vs (3, 1024)" in message
    assert "1000 classes" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# the command line: fine-tune, predict, freeze, wrong files
# ---------------------------------------------------------------------------------------------
def test_cli_finetunes_from_a_torchvision_file(finetuned, tv_file):
    require_ok(finetuned)
    reinit = [l for l in lines(finetuned["out"]) if "re-initialised" in l]
    assert reinit == [f"weights: loaded {tv_file}; re-initialised for 3 classes: aux1.fc2, aux2.fc2, fc"]
    best = checkpoint.load_checkpoint(finetuned["best"])
    assert best["variant"] == "torchvision" and best["classes"] == CLASSES and best["epoch"] == 1
    assert best["model"]["fc.weight"].shape == (3, 1024)
    assert sorted(os.listdir(finetuned["dir"])) == ["best.pth", "ci.json", "class_indices.json", "last.pth",
                                                    "metrics.csv", "suspect_labels.csv"]


def test_predict_uses_the_finetuned_best_pth(finetuned, tiny):
    require_ok(finetuned)
    image = os.path.join(tiny, "val", "roses", "roses_00.jpg")
    code, out, err = call(predict, [*FP32, image, "--weights", finetuned["best"], "--workers", "0", "--device", "cpu"])
    assert code == 0, out + err
    rows = [l.split() for l in out.splitlines()]
    assert sorted(r[0] for r in rows) == CLASSES
    probabilities = [float(r[1]) for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=2e-3)


def test_freeze_layers_trains_only_the_heads(tiny, tv_file, tmp_path):
    out_dir = str(tmp_path / "frozen")
    code, out, err = call(train, train_argv(tiny, out_dir, "--weights", tv_file, "--freeze-layers"))
    assert code == 0, out + err
    source = checkpoint.load_checkpoint(tv_file)["model"]
    trained = checkpoint.load_checkpoint(os.path.join(out_dir, "last.pth"))
    params = {name for name, _ in GoogLeNet(num_classes=3, aux_logits=True, variant="torchvision").named_parameters()}
    frozen = sorted(n for n in params if not n.startswith(HEADS))
    assert len(frozen) > 100
    for name in frozen:
        assert torch.equal(trained["model"][name], source[name]), f"{name} changed under --freeze-layers"
    # the heads did train: the new fc starts with zero biases, the aux fc1 layers came from the file
    assert trained["model"]["fc.bias"].abs().sum() > 0
    assert not torch.equal(trained["model"]["aux1.fc1.weight"], source["aux1.fc1.weight"])
    # only the head parameters are in the optimizer
    n_heads = sum(1 for n in params if n.startswith(HEADS))
    assert sum(len(g["params"]) for g in trained["optimizer"]["param_groups"]) == n_heads


def test_weights_of_another_architecture_are_a_one_line_error(tiny, tmp_path):
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    code, out, err = call(train, train_argv(tiny, str(tmp_path / "out"), "--weights", path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "missing keys: aux1." in err and "unexpected keys: bn1." in err and path in err
    assert "Traceback" not in out + err


def test_imagenet_without_network_is_a_one_line_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "IMAGENET_URL", "http://127.0.0.1:9/googlenet-1378be20.pth")  # port 9 refuses
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    start = time.monotonic()
    code, out, err = call(train, train_argv(tiny, str(tmp_path / "out"), "--weights", "imagenet"))
    assert time.monotonic() - start < 120
    assert code == 2, out + err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, err
    assert "cannot download the ImageNet weights" in errors[0] and "--weights FILE" in errors[0]
    assert "Traceback" not in out + err
    assert not os.path.exists(os.path.join(tmp_path, "out", "best.pth"))


def test_eval_only_does_not_reinitialise_heads_of_other_weights(tiny, tv_file, tmp_path):
    """Evaluating 1000-class weights on 3 classes must fail, not score freshly random heads."""
    code, out, err = call(train, [*FP32, "--eval-only", "--weights", tv_file, "--data-path", tiny,
                                     "--output-dir", tmp_path / "eval", "--workers", "0"])
    assert code == 2, out + err
    assert err.startswith("error: ") and "fc.weight (1000, 1024) vs (3, 1024)" in err
    assert "re-initialised" not in out


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def test_eval_only_prints_the_report_and_writes_the_confusion_matrix(finetuned, tiny, tmp_path):
    require_ok(finetuned)
    eval_dir = tmp_path / "eval"
    code, out, err = call(train, [*FP32, "--eval-only", "--weights", finetuned["best"], "--data-path", tiny,
                                     "--output-dir", eval_dir, "--workers", "0", "--batch-size", "4"])
    assert code == 0, out + err
    text = lines(out)
    overall = [re.fullmatch(r"accuracy: (\d\.\d{4}) \((\d+)/(\d+)\)  loss: \d+\.\d{4}  balanced accuracy: \d\.\d{4}  "
                            r"macro-F1: \d\.\d{4}", l) for l in text]
    overall = [m for m in overall if m]
    assert len(overall) == 1, out
    correct, total = int(overall[0].group(2)), int(overall[0].group(3))
    assert total == VAL_IMAGES and overall[0].group(1) == f"{correct / total:.4f}"

    header = text.index("class   precision  recall  accuracy  images")
    table = [l.split() for l in text[header + 1: header + 1 + len(CLASSES)]]
    assert [r[0] for r in table] == CLASSES
    assert [int(r[4]) for r in table] == [VAL_PER_CLASS] * len(CLASSES)
    assert all(0.0 <= float(v) <= 1.0 for r in table for v in r[1:4])

    start = text.index("confusion matrix (rows: true class, columns: predicted):")
    assert text[start + 1].split() == CLASSES
    printed = [[int(v) for v in l.split()[1:]] for l in text[start + 2: start + 2 + len(CLASSES)]]

    with open(eval_dir / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted"] + CLASSES
    assert [r[0] for r in rows[1:]] == CLASSES
    cells = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert cells == printed
    assert sum(map(sum, cells)) == VAL_IMAGES
    assert [sum(r) for r in cells] == [VAL_PER_CLASS] * len(CLASSES)
    assert sum(cells[i][i] for i in range(len(CLASSES))) == correct
    # the per-class table agrees with the matrix
    scores = metrics.per_class_scores(torch.tensor(cells))
    for row, (p, r, a, n) in zip(table, scores):
        assert row[1:] == [f"{p:.4f}", f"{r:.4f}", f"{a:.4f}", str(n)]
    # predictions.csv: one row per val image, in the val folder's order, agreeing with the matrix
    with open(eval_dir / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert list(predictions[0]) == ["file", "true_class", "predicted_class", "loss"] + [f"p_{c}" for c in CLASSES]
    assert [r["file"] for r in predictions] == sorted(str(p) for p in Path(tiny, "val").rglob("*.jpg"))
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


def test_per_class_scores_never_divide_by_zero():
    # class 1 is never predicted (precision 0); class 2 has no images (recall 0)
    got = metrics.per_class_scores(torch.tensor([[2, 0, 0], [1, 0, 0], [0, 0, 0]]))
    assert got == [(2 / 3, 1.0, 2 / 3, 2), (0.0, 0.0, 2 / 3, 1), (0.0, 0.0, 1.0, 0)]
    assert metrics.per_class_scores(torch.zeros(2, 2, dtype=torch.int64)) == [(0.0, 0.0, 0.0, 0)] * 2
