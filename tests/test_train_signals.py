"""train.py stopped by SIGINT (Ctrl-C) or SIGTERM in a real process: it finishes the step it is in,
saves last.pth, prints the command that resumes it and exits 128 + the signal's number, without a
traceback; the printed command finishes the run. Stops at a chosen step, resumed bit for bit:
test_resume.py."""
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

import train
from helpers import REPO, TRAIN, call, load, make_tree, script_env, train_argv


class Reader(threading.Thread):
    """Collects a pipe's output without blocking the test."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.chunks = pipe, []
        self.start()

    def run(self):
        for chunk in iter(lambda: self.pipe.read1(4096), b""):
            self.chunks.append(chunk)

    def text(self):
        return b"".join(self.chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("signals") / "data", n_train=4, n_val=1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_and_prints_the_resume_command(tree, tmp_path, monkeypatch, signum):
    out = tmp_path / "out dir"  # a space: the printed command must quote it
    # 6 steps of 2 images an epoch: the signal, sent when the first bar shows, lands in epoch 1
    argv = train_argv(tree, out, "--image-size", 48, epochs=2, batch_size=2)
    proc = subprocess.Popen([sys.executable, TRAIN, *argv], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = Reader(proc.stdout), Reader(proc.stderr)
    try:
        deadline = time.monotonic() + 300
        while "train 1/" not in stdout.text():  # the handlers are in place once the first bar shows
            assert proc.poll() is None, stdout.text() + stderr.text()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        proc.send_signal(signum)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout.join(10)
    stderr.join(10)
    text, err = stdout.text(), stderr.text()
    assert code == 128 + signum, text[-2000:] + err[-2000:]
    assert "Traceback" not in err
    assert f"{signal.Signals(signum).name}: stopped at epoch 1, step " in text
    lines = text.splitlines()
    command = lines[[i for i, line in enumerate(lines) if "Resume with:" in line][-1] + 1].strip()
    assert command.startswith("python train.py --resume ")
    words = shlex.split(command)
    assert words[3] == str(out / "last.pth")
    last = load(out / "last.pth")
    assert last["epoch"] == 0 and last["step"] >= 1 and "optimizer" in last

    if signum == signal.SIGINT:  # the printed command finishes the run (in-process: same argv, same cwd)
        monkeypatch.chdir(REPO)
        code, text, err = call(train, words[2:])
        assert code == 0, err
        assert "resuming" in text
        final = load(out / "last.pth")
        assert final["epoch"] == 2 and final["step"] == 0
        assert (out / "best.pth").is_file()
