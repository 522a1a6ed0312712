"""A run's output folder: one run per --output-dir (the lock, in a real second process), a folder
that holds a run is not written over, an output that cannot be written fails before any training,
and option combinations that cannot work are refused before anything is written. How the lock itself
behaves: test_run_lock.py; --resume: test_resume.py."""
import subprocess
import sys
import time

import pytest

import train
from helpers import REPO, assert_clean_error, call, make_tree, script_env, train_argv
from plumbing.run_lock import LOCK_NAME


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("run_folder") / "data", n_train=4, n_val=2)


def tiny(tree, out, *extra, epochs=2):
    return train_argv(tree, out, "--image-size", 48, *extra, epochs=epochs)


# ---------------------------------------------------------------------------------------------
# one run per output folder
# ---------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_while_the_first_runs_and_takes_over_after_it_was_killed(tree, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *tiny(tree, out, "--save-every", 1, epochs=500)],
                             cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
        first.kill()  # SIGKILL: no handler runs, the lock stays
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


def test_a_folder_that_holds_a_run_is_not_written_over(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=1, n_val=1)
    out = tmp_path / "out"
    out.mkdir()
    kept = b"the weights of an earlier run"
    (out / "best.pth").write_bytes(kept)  # only its presence matters: refused before it is read
    code, _, err = call(train, train_argv(tree, out, "--image-size", 32))
    assert_clean_error(code, err, f"{out} already holds a run", "--resume", "--output-dir", "--overwrite")
    assert (out / "best.pth").read_bytes() == kept and sorted(p.name for p in out.iterdir()) == ["best.pth"]
    code, _, err = call(train, train_argv(tree, out, "--image-size", 32, "--overwrite"))
    assert code == 0, err
    assert (out / "best.pth").read_bytes() != kept


@pytest.mark.quick
def test_an_unwritable_output_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub"
    argv = train_argv(make_tree(tmp_path / "data", n_train=1, n_val=1), out)
    argv[argv.index("--class-indices") + 1] = str(tmp_path / "ci.json")
    code, stdout, err = call(train, argv)
    assert_clean_error(code, err, f"cannot write to output folder {out}", "--output-dir")
    assert "train 1/" not in stdout
    assert not (tmp_path / "ci.json").exists()


@pytest.mark.quick
def test_an_unwritable_class_index_file_fails_before_training(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    argv = train_argv(make_tree(tmp_path / "data", n_train=1, n_val=1), tmp_path / "out")
    argv[argv.index("--class-indices") + 1] = str(blocker / "ci.json")
    code, stdout, err = call(train, argv)
    assert_clean_error(code, err, str(blocker / "ci.json"), "--class-indices")
    assert "train 1/" not in stdout


# ---------------------------------------------------------------------------------------------
# option combinations that cannot work are refused at start
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_a_val_resize_smaller_than_the_default_crop_is_refused(tree, tmp_path):
    # the crop defaults to 1.25 x the last --image-size: 60 px from a 48 px resize would be black-bordered
    code, _, err = call(train, tiny(tree, tmp_path / "out", "--val-resize", 48))
    assert_clean_error(code, err, "--val-resize 48 is smaller than the evaluation crop 60", "--val-crop")
    assert not (tmp_path / "out").exists()  # refused before anything was written
