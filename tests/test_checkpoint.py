"""The one checkpoint format (inference/checkpoint.py) and what last.pth adds (training/run_state.py):
what a run's files hold (docs/design.md lists it), round trips from a model to the file and back into
the model predict.py builds, plain and wrapped state dicts, files from older versions, the class
index file, and weights that are NaN or infinite refused by every command."""
import json
import os
import random

import pytest
import torch
from torch import nn

import export
import predict
import train
from helpers import CLASSES, assert_clean_error, call, eval_argv, load, needs, train_argv
from inference import checkpoint as ckpt
from inference import images
from model import GoogLeNet
from plumbing import device as dev
from plumbing.options import UserError
from training import recipe, run_state, schedule

CPU = torch.device("cpu")


def test_a_run_writes_what_a_checkpoint_holds(small_run):
    out = small_run["out"]
    assert sorted(os.listdir(out)) == ["best.pth", "ci.json", "class_indices.json", "last.pth", "metrics.csv",
                                       "suspect_labels.csv"]
    expected = {str(i): c for i, c in enumerate(sorted(CLASSES))}
    assert json.loads((out / "class_indices.json").read_text()) == expected
    assert json.loads(small_run["ci"].read_text()) == expected  # --class-indices: the same file, elsewhere too

    best = load(small_run["best"])
    assert best["classes"] == sorted(CLASSES)
    # the default recipe's layout, the run's sizes (1.25 x the 48 px crops, resized to --val-resize 64)
    assert best["variant"] == "torchvision" and best["image_size"] == 48 and best["image_size_schedule"] == [48, 48]
    assert (best["val_resize"], best["val_crop"]) == (64, 60)
    assert (tuple(best["mean"]), tuple(best["std"])) == (images.MEAN, images.STD)
    assert best["split"] is None  # a train/ + val/ tree: nothing held out by train.py
    assert best["args"]["data_path"] == str(small_run["data"]) and best["args"]["cwd"] == os.getcwd()
    assert any(k.startswith("aux1.") for k in best["model"]) and best["model"]["fc.weight"].shape[0] == 3
    assert best["epoch"] == 1 and 0 <= best["val_accuracy"] <= 1
    assert set(best["val_scores"]) == {"accuracy", "balanced_accuracy", "macro_f1"}

    last = load(small_run["last"])
    assert (last["epoch"], last["step"]) == (1, 0)
    training_state = {"optimizer", "scheduler", "scaler", "model_ema", "epoch_loss_sum", "epoch_seen", "epoch_correct",
                      "best_score", "best_epoch", "bad_images", "plan", "rng"}
    assert training_state <= set(last) and training_state.isdisjoint(best)
    assert len(last["rng"]) == 1 and last["plan"]["epochs"] == 1 and last["bad_images"] == []


@pytest.mark.quick
def test_a_checkpoint_loads_into_the_model_predict_py_builds(tmp_path):
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, init_weights=True, variant="torchvision").eval()
    preprocessing = images.Preprocessing(72, 64)
    record = ckpt.Record(["a", "b", "c"], "torchvision", (48, 64), preprocessing, None, {"lr": 0.1})
    ckpt.save_checkpoint(record.describe(model), str(tmp_path / "best.pth"))
    loaded, classes, got = ckpt.load_model(str(tmp_path / "best.pth"), "unused.json", CPU)
    assert classes == ["a", "b", "c"] and got == preprocessing
    assert not loaded.aux_logits and loaded.variant == "torchvision"  # prediction drops the aux heads
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():  # the loaded model runs channels_last: the same function, rounded differently
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    saved = ckpt.load_checkpoint(str(tmp_path / "best.pth"))
    assert (saved["image_size"], saved["image_size_schedule"], saved["args"]) == (64, [48, 64], {"lr": 0.1})


@pytest.mark.quick
def test_plain_and_wrapped_state_dicts_load(tmp_path):
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, aux_logits=True).eval()  # the classic googleNet.pth: paper variant, aux heads
    ckpt.write_class_indices(str(tmp_path / "ci.json"), ["a", "b", "c"])
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")  # DDP's prefix
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    for name in ("plain.pth", "ddp.pth"):
        assert set(ckpt.load_checkpoint(str(tmp_path / name))) == {"model"}
        loaded, classes, preprocessing = ckpt.load_model(str(tmp_path / name), str(tmp_path / "ci.json"), CPU)
        assert classes == ["a", "b", "c"] and loaded.variant == "paper"
        assert preprocessing == images.Preprocessing(224, 224)  # what the classic script used
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), expected)
    assert ckpt.guess_variant(GoogLeNet(num_classes=3, variant="torchvision").state_dict()) == "torchvision"


@pytest.mark.quick
def test_files_from_before_the_separate_evaluation_sizes_record_one_size():
    assert ckpt.preprocessing_of({"image_size": 96}) == images.Preprocessing(96, 96)
    assert ckpt.preprocessing_of({"val_crop": 80, "image_size": 64}) == images.Preprocessing(80, 80)
    assert ckpt.preprocessing_of({}) == images.Preprocessing(224, 224)


@pytest.mark.quick
def test_last_pth_round_trips_the_training_state_and_the_random_generators(tmp_path):
    def training_state(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        args = train.get_args_parser().parse_args([])
        optimizer = recipe.build_optimizer(args, list(model.parameters()))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
        return run_state.TrainingState(model, optimizer, scheduler, dev.grad_scaler(CPU, None),
                                       recipe.build_ema(args, model))

    state = training_state(0)
    for _ in range(2):
        state.model(torch.randn(8, 4)).square().mean().backward()
        state.optimizer.step()
        state.scheduler.step()
        state.ema.update_parameters(state.model)
    progress = run_state.Progress(epoch=2, step=1, loss_sum=3.5, seen=8, correct=5, best_score=0.75, best_epoch=1,
                                  bad_images=["x.jpg"], plan=schedule.fixed_plan(4))
    record = ckpt.Record(["a", "b", "c"], "paper", (32, 32), images.Preprocessing(40, 40), None, {})
    random.seed(7)
    rngs = [run_state.capture_rng_state(CPU)]
    expected_draws = (random.random(), torch.rand(3))
    path = tmp_path / "last.pth"
    run_state.save_training(str(path), record, state, progress, rngs)

    fresh = training_state(1)
    restored = run_state.restore_training(ckpt.load_checkpoint(str(path)), str(path), fresh, 0, CPU,
                                          schedule.fixed_plan(4))
    assert random.random() == expected_draws[0] and torch.equal(torch.rand(3), expected_draws[1])  # the same draws
    assert restored == progress
    for a, b in ((state.model, fresh.model), (state.ema, fresh.ema)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    assert fresh.scheduler.last_epoch == 2 and fresh.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    for key, moments in state.optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(fresh.optimizer.state_dict()["state"][key][name], value), name

    budget_run = dict(ckpt.load_checkpoint(str(path)), plan=schedule.budget_plan(0.2).to_dict())
    with pytest.raises(UserError, match="is a --time-budget run: resume it with --time-budget 0.2"):
        run_state.restore_training(budget_run, str(path), training_state(2), 0, CPU, schedule.fixed_plan(4))
    with pytest.raises(UserError, match="was not a --time-budget run: resume it without --time-budget"):
        run_state.restore_training(ckpt.load_checkpoint(str(path)), str(path), training_state(2), 0, CPU,
                                   schedule.budget_plan(0.2))


# ---------------------------------------------------------------------------------------------
# the class index file
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_write_class_indices_content_and_round_trip(tmp_path):
    path = tmp_path / "class_indices.json"
    classes = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    ckpt.write_class_indices(str(path), classes)
    text = path.read_text()
    assert json.loads(text) == {"0": "daisy", "1": "dandelion", "2": "roses", "3": "sunflowers", "4": "tulips"}
    assert text.startswith('{\n    "0": "daisy",') and text.endswith("}\n")
    assert ckpt.read_class_indices(str(path)) == classes
    ckpt.write_class_indices(str(path), ["a", "b"])  # overwriting replaces the whole file
    assert ckpt.read_class_indices(str(path)) == ["a", "b"]


@pytest.mark.quick
def test_a_missing_or_foreign_class_index_file_is_one_error(tmp_path):
    with pytest.raises(UserError, match="does not exist: pass --class-indices"):
        ckpt.read_class_indices(str(tmp_path / "none.json"))
    (tmp_path / "list.json").write_text('["daisy", "roses"]')
    with pytest.raises(UserError, match=r'is not a class index file like \{"0": "daisy"'):
        ckpt.read_class_indices(str(tmp_path / "list.json"))


# ---------------------------------------------------------------------------------------------
# weights that are NaN or infinite
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def nan_weights(small_run, tmp_path):
    best = load(small_run["best"])
    best["model"]["inception4a.branch1.conv.weight"][0, 0, 0, 0] = float("nan")
    best["model"]["fc.bias"][1] = float("inf")
    torch.save(best, tmp_path / "diverged.pth")
    return tmp_path / "diverged.pth"


def test_weights_with_nan_or_inf_are_refused_everywhere(small_run, nan_weights, tmp_path):
    tree = small_run["data"]
    image = next((tree / "val").rglob("*.jpg"))
    code, _, err = call(predict, ["--amp", "off", image, "--weights", nan_weights])
    assert_clean_error(code, err, str(nan_weights), "NaN or infinite", "fc.bias", "inception4a.branch1.conv.weight")
    code, _, err = call(train, eval_argv(nan_weights, tree, tmp_path / "ev"))
    assert_clean_error(code, err, str(nan_weights), "NaN or infinite")
    code, _, err = call(train, train_argv(tree, tmp_path / "ft", "--weights", nan_weights))
    assert_clean_error(code, err, str(nan_weights), "NaN or infinite")


@needs("onnxscript")
def test_export_refuses_weights_with_nan_or_inf(nan_weights, tmp_path):
    code, _, err = call(export, ["--weights", nan_weights, "--output", tmp_path / "x.onnx"])
    assert_clean_error(code, err, str(nan_weights), "NaN or infinite")
    assert not (tmp_path / "x.onnx").exists()
