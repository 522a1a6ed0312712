"""--resume: a run stopped between epochs or in the middle of one continues bit for bit (the weights,
the EMA, the optimizer, every augmentation and MixUp/CutMix draw, in fp32 and in bf16) from the bare
command a stop prints, with the options the run recorded; an option that would change the result is
refused, one that only changes how it runs is taken. Stops come from a StopRequest.check patched to
stop after a given step (test_train_signals.py sends real signals)."""
import csv
import shutil
import signal

import pytest
import torch

import train
from helpers import assert_clean_error, call, load, make_tree, stop_after_step, train_argv
from model import GoogLeNet
from plumbing import options, stopping
from plumbing.options import UserError
from training import run_state


def same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("resume") / "data", n_train=4, n_val=2)  # 3 steps of 4 an epoch


def tiny(tree, out, *extra, epochs=2):
    return train_argv(tree, out, "--image-size", 48, *extra, epochs=epochs)


@pytest.fixture(scope="module")
def stopped(tree, tmp_path_factory):
    """A 2-epoch run, uninterrupted ("whole"), and the same run stopped after step 4 ("cut": step 1
    of epoch 2) with a copy of the last.pth that epoch 1's end left ("epoch1")."""
    root = tmp_path_factory.mktemp("stopped")
    whole, cut = root / "whole", root / "cut"
    assert call(train, tiny(tree, whole))[0] == 0
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stopping.StopRequest, "check", stop_after_step(4, cut, root / "after_epoch_1.pth"))
        code, stdout, _ = call(train, tiny(tree, cut))
    assert code == 128 + signal.SIGTERM
    return {"whole": whole, "cut": cut, "stdout": stdout, "epoch1": root / "after_epoch_1.pth"}


def copy_run(stopped, folder):
    shutil.copytree(stopped["cut"], folder)
    return folder / "last.pth"


def test_a_stop_prints_the_bare_resume_command(stopped):
    assert "stopped at epoch 2, step 1" in stopped["stdout"]
    assert f"python train.py --resume {stopped['cut'] / 'last.pth'}" in stopped["stdout"].splitlines()[-1]


def test_a_bare_resume_from_another_folder_continues_mid_epoch_bit_for_bit(stopped, tmp_path, monkeypatch):
    last = copy_run(stopped, tmp_path / "cut")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the run's paths were given from another folder
    code, stdout, err = call(train, ["--resume", last])
    assert code == 0, err
    assert "resuming" in stdout and "epoch 2, step 1" in stdout
    whole, resumed = load(stopped["whole"] / "last.pth"), load(last)
    for key in ("model", "model_ema"):
        same_weights(whole[key], resumed[key])
    same_weights(load(stopped["whole"] / "best.pth")["model"], load(tmp_path / "cut" / "best.pth")["model"])
    assert list((tmp_path / "elsewhere").iterdir()) == []  # written into the run's own folder


def test_a_resume_between_epochs_is_bit_for_bit(stopped, tmp_path):
    saved = load(stopped["epoch1"])
    assert (saved["epoch"], saved["step"]) == (1, 0)  # epoch 1 whole, nothing of epoch 2
    (tmp_path / "B").mkdir()
    shutil.copy(stopped["epoch1"], tmp_path / "B" / "last.pth")
    with open(stopped["cut"] / "metrics.csv") as f:
        (tmp_path / "B" / "metrics.csv").write_text("".join(f.readlines()[:2]))  # the header and epoch 1
    code, out, err = call(train, ["--resume", tmp_path / "B" / "last.pth"])
    assert code == 0, err
    assert "epoch 2, step 0" in out and "[epoch 2]" in out and "[epoch 1]" not in out
    same_weights(load(stopped["whole"] / "last.pth")["model"], load(tmp_path / "B" / "last.pth")["model"])
    with open(tmp_path / "B" / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


@pytest.mark.parametrize("option, value, words", [
    ("--batch-size", "2", "--batch-size 2 differs from the run's 4"),
    ("--lr", "0.01", "--lr 0.01 differs from the run's 0.001"),
    ("--opt", "sgd", "--opt sgd differs"),
    ("--seed", "3", "--seed 3 differs"),
    ("--image-size", "64", "--image-size (64, 64) differs from the run's (48, 48)"),
    ("--no-model-ema", None, "--model-ema False differs from the run's True"),
    ("--epochs", "5", "planned for 2 epochs"),
])
def test_resume_refuses_an_option_that_changes_the_result(stopped, option, value, words):
    code, _, err = call(train, ["--resume", stopped["cut"] / "last.pth", option, *([value] if value else [])])
    assert_clean_error(code, err, words)


def test_resume_applies_an_option_that_changes_only_how_it_runs(stopped, tmp_path):
    last = copy_run(stopped, tmp_path / "copy")
    code, stdout, err = call(train, ["--resume", last, "--no-channels-last", "--batch-size", "4"])
    assert code == 0, err
    assert "resume: --channels-last False (the run had True)" in stdout  # the same --batch-size: nothing said
    assert "--batch-size" not in stdout


def test_resume_refuses_another_number_of_processes(stopped):
    resume = load(stopped["cut"] / "last.pth")
    args = train.get_args_parser().parse_args([])
    with pytest.raises(UserError, match="saved by a run of 1 process.* this one has 2"):
        run_state.resumed_args(args, {}, resume, str(stopped["cut"] / "last.pth"), 2, print)


def test_a_last_pth_without_the_ema_asks_to_resume_without_it(stopped, tmp_path):
    """A last.pth whose options say --model-ema but that holds no average (a file of an older
    version): one line, before any step."""
    resume = load(stopped["cut"] / "last.pth")
    del resume["model_ema"]
    (tmp_path / "run").mkdir()
    torch.save(resume, tmp_path / "run" / "last.pth")
    code, out, err = call(train, ["--resume", tmp_path / "run" / "last.pth"])
    assert_clean_error(code, err, "was saved without --model-ema: resume without it")
    assert "train 2/" not in out


def older_last_pth(tmp_path, missing="outliers"):
    """A last.pth's contents as resumed_args reads them, from a run of a version before `missing` existed."""
    recorded = vars(train.get_args_parser().parse_args(["--data-path", str(tmp_path / "data")]))
    del recorded[missing]
    return {"args": {**recorded, "cwd": str(tmp_path)}, "rng": [None]}


@pytest.mark.quick
@pytest.mark.parametrize("value", ["8", "0"])
def test_resume_refuses_an_option_the_run_never_recorded(tmp_path, value):
    """--outliers on a run saved before --outliers existed was taken (and its absence read as the
    new option's default), changing the run halfway: refused like any option that changes it."""
    parser = train.get_args_parser()
    argv = ["--resume", str(tmp_path / "last.pth"), "--outliers", value]
    with pytest.raises(UserError, match=f"--outliers {value}: .*last.pth does not record --outliers"):
        run_state.resumed_args(parser.parse_args(argv), options.given_options(parser, argv), older_last_pth(tmp_path),
                               str(tmp_path / "last.pth"), 1, print)


@pytest.mark.quick
def test_resume_without_an_option_the_run_never_recorded_says_what_it_runs_with(tmp_path):
    parser = train.get_args_parser()
    argv = ["--resume", str(tmp_path / "last.pth"), "--workers", "1"]  # a how-it-runs option may be given anew
    said = []
    args = run_state.resumed_args(parser.parse_args(argv), options.given_options(parser, argv),
                                  older_last_pth(tmp_path), str(tmp_path / "last.pth"), 1, said.append)
    assert args.outliers == 0 and args.workers == 1
    assert any("options newer than its run" in line and "defaults: --outliers 0" in line for line in said), said


def test_a_resume_with_an_option_its_last_pth_never_recorded_is_one_line(stopped, tmp_path):
    resume = load(stopped["cut"] / "last.pth")
    del resume["args"]["outliers"]  # as a run saved before --outliers existed
    (tmp_path / "run").mkdir()
    torch.save(resume, tmp_path / "run" / "last.pth")
    code, out, err = call(train, ["--resume", tmp_path / "run" / "last.pth", "--outliers", 4])
    assert_clean_error(code, err, "--outliers 4", "does not record --outliers")
    assert "train 2/" not in out


@pytest.mark.quick
def test_resume_of_a_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "gone" / "last.pth"
    code, _, err = call(train, train_argv(tmp_path / "data", tmp_path / "out", "--resume", missing))
    assert_clean_error(code, err, str(missing), "does not exist")


@pytest.mark.quick
def test_resume_from_a_weights_only_file_is_one_line(tmp_path):
    weights = tmp_path / "plain.pth"
    torch.save(GoogLeNet(num_classes=3).state_dict(), weights)
    code, _, err = call(train, train_argv(tmp_path / "data", tmp_path / "out", "--resume", weights))
    assert_clean_error(code, err, str(weights), "not a run to resume")


# ---------------------------------------------------------------------------------------------
# every recipe tool on, in fp32 and bf16
# ---------------------------------------------------------------------------------------------
RECIPE = ["--image-size", 32, "--val-crop", 40, "--auto-augment", "trivialaugment", "--random-erase", 0.5,
          "--mixup-alpha", 0.2, "--cutmix-alpha", 1.0, "--model-ema", "--model-ema-decay", 0.9,
          "--label-smoothing", 0.1, "--variant", "torchvision", "--outliers", 3]


@pytest.fixture(scope="module")
def recipe_epoch(tree, tmp_path_factory):
    """One uninterrupted epoch with every recipe tool on (3 steps of 4 images), in fp32."""
    out = tmp_path_factory.mktemp("recipe") / "A"
    assert call(train, train_argv(tree, out, *RECIPE))[0] == 0
    return out


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_resume_mid_epoch_with_every_recipe_tool_is_bit_for_bit(tree, recipe_epoch, tmp_path, monkeypatch, amp):
    """Stopped after step 2 and resumed from the --save-every save after step 1, the run must end
    on the uninterrupted run's weights, EMA and best.pth exactly (augmentation, erasing, MixUp/CutMix
    draws, the generated outliers and the EMA all included), in fp32 and in bf16."""
    reference = recipe_epoch
    if amp == "bf16":
        reference = tmp_path / "A"
        assert call(train, train_argv(tree, reference, *RECIPE, amp="bf16"))[0] == 0
    out, saved = tmp_path / "C", tmp_path / "after_step_1.pth"
    argv = train_argv(tree, out, *RECIPE, amp=amp)
    with monkeypatch.context() as m:
        m.setattr(stopping.StopRequest, "check", stop_after_step(2, out, saved))
        code, stdout, err = call(train, argv + ["--save-every", "1"])
    assert code == 128 + signal.SIGTERM, err
    assert "stopped at epoch 1, step 2" in stdout
    assert not (out / "best.pth").exists()
    stopped, mid = load(out / "last.pth"), load(saved)
    assert (stopped["epoch"], stopped["step"]) == (0, 2)  # in epoch 1 (none completed), after step 2
    assert (mid["epoch"], mid["step"]) == (0, 1)
    code, stdout, err = call(train, argv + ["--resume", saved, "--save-every", "0"])  # into out, at the epoch's end
    assert code == 0, err
    assert "epoch 1, step 1" in stdout
    a, c = load(reference / "last.pth"), load(out / "last.pth")
    assert (c["epoch"], c["step"]) == (1, 0)
    for key in ("model", "model_ema"):
        same_weights(a[key], c[key])
    same_weights(load(reference / "best.pth")["model"], load(out / "best.pth")["model"])
