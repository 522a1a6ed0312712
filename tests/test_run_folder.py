"""A run's folder and its options: one run per --output-dir (the lock), --resume that continues the
run as last.pth records it, and the option combinations that are refused at start."""
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

import train
from helpers import REPO, assert_clean_error, call, load, make_tree, script_env, stop_after_step, train_argv
from plumbing.run_lock import LOCK_NAME
from training import data, run_state


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("run_folder") / "data", n_train=4, n_val=2)


def tiny(tree, out, *extra, epochs=2):
    return train_argv(tree, out, "--image-size", 48, "--save-every", 1, *extra, epochs=epochs)


# ---------------------------------------------------------------------------------------------
# one run per output folder
# ---------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_while_the_first_runs_and_takes_over_after_it_was_killed(tree, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *tiny(tree, out, epochs=500)], cwd=REPO,
                             env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        code, _, err = call(train, tiny(tree, out, "--overwrite"))  # the first may not have saved yet
        assert "training" in assert_clean_error(code, err, "is in use", f"pid {first.pid}", f"kill {first.pid}")
        while not (out / "last.pth").exists():  # --save-every 1: after its first step
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        code, _, err = call(train, ["--resume", out / "last.pth"])
        assert_clean_error(code, err, "is in use", f"pid {first.pid}")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()
    assert (out / LOCK_NAME).exists()  # a killed run leaves its lock
    code, stdout, err = call(train, tiny(tree, out, "--overwrite", epochs=1))
    assert code == 0, err
    assert "taking over" in stdout and "stale" in stdout
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_the_lock_goes_however_the_run_ends(tree, tmp_path):
    out = tmp_path / "out"
    code, _, err = call(train, tiny(tree, out, "--lr", "1e30", epochs=1))  # diverges: a TrainingError
    assert code != 0 and "diverged" in err
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# --resume continues the run as it was
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped(tree, tmp_path_factory):
    """A 2-epoch run stopped after step 4 (of 3 a epoch: in epoch 2), and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("stopped")
    whole = root / "whole"
    assert call(train, tiny(tree, whole, "--batch-size", 4))[0] == 0
    cut = root / "cut"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train.step.StopRequest, "check", stop_after_step(4, cut, root / "after_3.pth"))
        code, stdout, _ = call(train, tiny(tree, cut, "--batch-size", 4))
    assert code == 128 + signal.SIGTERM
    return {"whole": whole, "cut": cut, "stdout": stdout}


def test_a_stop_prints_the_bare_resume_command(stopped):
    assert f"python train.py --resume {stopped['cut'] / 'last.pth'}" in stopped["stdout"].splitlines()[-1]


def test_a_bare_resume_from_another_folder_continues_bit_for_bit(stopped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's paths were given from elsewhere
    code, stdout, err = call(train, ["--resume", stopped["cut"] / "last.pth"])
    assert code == 0, err
    assert "resuming" in stdout and "epoch 2, step 1" in stdout
    whole, resumed = load(stopped["whole"] / "last.pth"), load(stopped["cut"] / "last.pth")
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert not (tmp_path / "weights").exists()  # written into the run's own folder


@pytest.mark.parametrize("option, value, words", [
    ("--batch-size", "2", "--batch-size 2 differs from the run's 4"),
    ("--lr", "0.01", "--lr 0.01 differs from the run's 0.001"),
    ("--opt", "sgd", "--opt sgd differs"),
    ("--seed", "3", "--seed 3 differs"),
    ("--image-size", "64", "--image-size (64, 64) differs from the run's (48, 48)"),
    ("--epochs", "5", "planned for 2 epochs"),
])
def test_resume_refuses_an_option_that_changes_the_result(stopped, option, value, words):
    code, _, err = call(train, ["--resume", stopped["cut"] / "last.pth", option, value])
    assert_clean_error(code, err, words)


def test_resume_applies_an_option_that_changes_only_how_it_runs(stopped, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "last.pth").write_bytes((stopped["cut"] / "last.pth").read_bytes())
    code, stdout, err = call(train, ["--resume", copy / "last.pth", "--no-channels-last", "--batch-size", "4"])
    assert code == 0, err
    assert "resume: --channels-last False (the run had True)" in stdout  # the same --batch-size: nothing said


def test_resume_refuses_another_number_of_processes(stopped):
    resume = load(stopped["cut"] / "last.pth")
    args = train.get_args_parser().parse_args([])
    with pytest.raises(run_state.ResumeError, match="saved by a run of 1 process.* this one has 2"):
        run_state.resumed_args(args, {}, resume, str(stopped["cut"] / "last.pth"), 2, print)


# ---------------------------------------------------------------------------------------------
# option combinations that cannot work are refused at start
# ---------------------------------------------------------------------------------------------
def test_a_val_resize_smaller_than_the_default_crop_is_refused(tree, tmp_path):
    # the crop defaults to 1.25 x the last --image-size: 60 px from a 48 px resize would be black-bordered
    code, _, err = call(train, tiny(tree, tmp_path / "out", "--val-resize", 48))
    assert_clean_error(code, err, "--val-resize 48 is smaller than the evaluation crop 60", "--val-crop")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_eval_only_with_a_val_resize_smaller_than_the_recorded_crop_is_refused(stopped, tree, tmp_path):
    code, _, err = call(train, ["--eval-only", "--weights", stopped["whole"] / "best.pth", "--data-path", tree,
                                "--output-dir", tmp_path, "--val-resize", 56, "--amp", "off"])
    assert_clean_error(code, err, "--val-resize 56 is smaller than the evaluation crop 60", "recorded in")


def test_fine_tuning_a_checkpoint_on_another_plain_folder_splits_it_afresh(stopped, tmp_path):
    other = make_tree(tmp_path / "other", classes=("a", "b"), n_train=6, n_val=0) / "train"
    code, stdout, err = call(train, train_argv(other, tmp_path / "tuned", "--weights", stopped["whole"] / "best.pth",
                                               "--image-size", 48, "--val-ratio", 0.5))
    assert code == 0, err
    assert "held out for val (ratio 0.5, seed 0): a 3/3, b 3/3" in stdout


def test_progressive_resizing_lets_the_first_loaders_workers_go(tree, tmp_path, monkeypatch):
    """A loader's persistent workers end when nothing holds the loader: after each change of crop
    size nothing may hold the one before (the run's first loader was once held to the end)."""
    replaced = []
    with_crop = data.with_crop

    def watching(loaders, size, args, device):
        before = weakref.ref(loaders.train)
        with_crop(loaders, size, args, device)
        if loaders.train is not before():
            replaced.append(before)

    monkeypatch.setattr(data, "with_crop", watching)
    argv = train_argv(tree, tmp_path / "out", "--image-size", "32:96", "--cache", "off", epochs=3)
    argv[argv.index("--workers") + 1] = "1"
    code, _, err = call(train, argv)
    assert code == 0, err
    assert len(replaced) == 2 and all(ref() is None for ref in replaced)  # crops 32, 64, 96
