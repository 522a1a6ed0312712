"""Files that must survive a crash: plumbing/atomic.py's atomic_write and the files written with it.

  (a) a write that fails halfway leaves the old file byte-identical and no temporary file;
  (b) SIGKILL at random moments during repeated ~20 MB checkpoint saves never leaves a damaged file;
  (c) an unwritable destination raises OSError and creates nothing;
  (d) saved files get the usual permissions from the umask, not mkstemp's 0600.
What the files hold: test_checkpoint.py, test_metrics.py; a disk that fills up: test_disk_full.py.
"""
import os
import random
import stat
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO
from inference import checkpoint
from plumbing import atomic
from training import metrics


def leftovers(folder, keep):
    """Every entry of folder except the names in keep."""
    return sorted(set(os.listdir(folder)) - set(keep))


# ---------------------------------------------------------------------------------------------
# (a) a failed write keeps the old file
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_write_failing_halfway_keeps_old_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "last.pth"
    checkpoint.save_checkpoint({"model": {"w": torch.arange(10.0)}, "epoch": 1}, str(path))
    old = path.read_bytes()

    def write(f):
        f.write(b"PK\x03\x04 half of a new checkpoint" * 1000)
        f.flush()
        raise error

    with pytest.raises(type(error)):
        atomic.atomic_write(str(path), write)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["last.pth"]
    assert checkpoint.load_checkpoint(str(path))["epoch"] == 1


@pytest.mark.quick
def test_torch_save_failing_halfway_keeps_old_file(tmp_path):
    path = tmp_path / "best.pth"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}}, str(path))
    old = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    # the tensor is written first, then pickling fails
    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(100_000)}, "bad": Unpicklable()}, str(path))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["best.pth"]


# ---------------------------------------------------------------------------------------------
# (b) SIGKILL during saves
# ---------------------------------------------------------------------------------------------
# A server process imports torch once and forks a saver per round (a fresh interpreter would
# spend seconds importing torch every time); the saver only ever touches torch after the fork.
SAVER_SERVER = r"""
import os, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch
from plumbing import atomic
from inference import checkpoint
from training import metrics

path, n = sys.argv[2], int(sys.argv[3])
for line in sys.stdin:
    command, arg = line.split()
    if command == "go":  # save {counter, tensor filled with counter} again and again, from arg on
        pid = os.fork()
        if pid == 0:
            try:
                counter = int(arg)
                while True:
                    checkpoint.save_checkpoint({"model": {"w": torch.full((n,), float(counter))},
                                                "counter": counter}, path)
                    counter += 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        print(pid, flush=True)
    elif command == "reap":  # how the saver ended: the signal number, or minus its exit code
        _, status = os.waitpid(int(arg), 0)
        print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status), flush=True)
"""

N_FLOATS = 5_000_000  # 20 MB of float32
KILLS = 15


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "WTERMSIG"), reason="needs fork() and SIGKILL")
def test_sigkill_during_saves_never_leaves_a_damaged_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-c", SAVER_SERVER, str(REPO), str(path), str(N_FLOATS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(line):
        server.stdin.write(line + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        assert answer, f"the saver server died (seed {seed})"
        return int(answer)

    running = set()

    def kill(pid):
        os.kill(pid, 9)
        running.discard(pid)
        assert ask(f"reap {pid}") == 9, f"the saver had already stopped before the kill (seed {seed})"

    last_counter, counters = -1, []
    try:
        # first round: wait for one complete save, so every later check has a file to read
        pid = ask("go 0")
        running.add(pid)
        deadline = time.monotonic() + 120
        while not path.exists():
            assert time.monotonic() < deadline, "no checkpoint saved within 120 s"
            time.sleep(0.01)
        for k in range(KILLS):
            if k:
                pid = ask(f"go {k * 100_000}")  # every round counts from higher up
                running.add(pid)
            time.sleep(rng.uniform(0.0, 0.3))
            kill(pid)
            loaded = checkpoint.load_checkpoint(str(path))  # raises UserError if damaged
            counter, w = loaded["counter"], loaded["model"]["w"]
            assert w.shape == (N_FLOATS,) and bool((w == float(counter)).all()), f"seed {seed}"
            assert counter >= last_counter, f"an older checkpoint came back (seed {seed})"
            last_counter = counter
            counters.append(counter)
    finally:
        for pid in running:  # a failed check must not leave a saver running
            os.kill(pid, 9)
        server.stdin.close()
        server.wait(timeout=30)
    # a kill can leave its temporary file behind (nothing runs after SIGKILL), but nothing else
    temps = leftovers(tmp_path, ["last.pth"])
    assert all(n.startswith(".last.pth.") and n.endswith(".tmp") for n in temps), temps
    assert len(counters) == KILLS
    for name in temps:  # up to 20 MB each
        os.remove(tmp_path / name)


# ---------------------------------------------------------------------------------------------
# (c) unwritable destinations
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("where", ["removed folder", "under a regular file"])
def test_unwritable_destination_raises_oserror_and_creates_nothing(tmp_path, where):
    (tmp_path / "a_file").write_text("x")
    before = sorted(os.listdir(tmp_path))
    parent = tmp_path / ("gone" if where == "removed folder" else "a_file")
    for save in (lambda p: checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}}, p),
                 lambda p: atomic.atomic_write_text(p, "text"),
                 lambda p: checkpoint.write_class_indices(p, ["a", "b"])):
        with pytest.raises(OSError):
            save(str(parent / "best.pth"))
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "a_file").read_text() == "x"


@pytest.mark.quick
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_raises_oserror_and_creates_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError):
            atomic.atomic_write_text(str(folder / "x.json"), "{}")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# (d) permissions
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoint.save_checkpoint({"model": {"w": torch.ones(2)}}, str(tmp_path / "best.pth"))
        checkpoint.write_class_indices(str(tmp_path / "class_indices.json"), ["a"])
        metrics.append_metrics(str(tmp_path / "metrics.csv"), 1, {"lr": 0.1})
        # replacing an existing file gives it the same normal permissions
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(2)}}, str(tmp_path / "best.pth"))
        assert os.umask(umask) == umask  # the helper that reads the umask put it back
    finally:
        os.umask(old)
    for name in ("best.pth", "class_indices.json", "metrics.csv"):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o666 & ~umask, f"{name}: {oct(mode)}"
