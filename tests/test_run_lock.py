"""plumbing/run_lock.py: one process at a time in a run's folder. No training here: the processes
are tiny `python -c` scripts importing only plumbing (no torch), a few hundredths of a second each."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from helpers import REPO, assert_clean_error, run_script
from plumbing import run_lock
from plumbing.run_lock import LOCK_NAME, CannotLock, FolderInUse, RunLock, check_free, probe_writable

pytestmark = pytest.mark.quick

# takes the lock on argv[1], says so by creating argv[2], holds it until argv[3] exists
HOLD = """
import os, sys, time
from plumbing.run_lock import RunLock
folder, ready, let_go = sys.argv[1:4]
with RunLock(folder, purpose="training"):
    open(ready, "w").close()
    while not os.path.exists(let_go):
        time.sleep(0.01)
"""

# creates argv[2] once started, waits for argv[3] (all racers start together), tries the lock on
# argv[1], writes what happened to argv[4], and holds what it got until argv[5] exists
RACE = """
import os, sys, time
from plumbing.run_lock import FolderInUse, RunLock
folder, ready, go, result, done = sys.argv[1:6]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
taken = []
try:
    lock = RunLock(folder, purpose="training", log=taken.append).acquire()
    outcome = "won: " + " ".join(taken)
except FolderInUse as e:
    lock, outcome = None, "refused: " + str(e)
with open(result + ".tmp", "w") as f:
    f.write(outcome)
os.rename(result + ".tmp", result)
while not os.path.exists(done):
    time.sleep(0.01)
if lock:
    lock.release()
"""


def wait_for(path, process=None, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}): {process.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def start(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hold_in_another_process(folder, signals):
    """A process holding folder's lock (until signals/let-go exists)."""
    signals.mkdir(exist_ok=True)
    holder = start(HOLD, folder, signals / "ready", signals / "let-go")
    wait_for(signals / "ready", holder)
    return holder


def write_lock(folder, **fields):
    """A lock file written by hand: a live-looking record of this host unless fields say otherwise."""
    record = dict(pid=os.getpid(), host=socket.gethostname(), started="2024-05-01T10:00:00+02:00",
                  command="python train.py --output-dir w", purpose="training", token=uuid.uuid4().hex)
    record.update(fields)
    (folder / LOCK_NAME).write_text(json.dumps(record))
    return record


def dead_pid():
    """The pid of a process that has ended (and been waited for)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith(LOCK_NAME))


def test_a_second_lock_in_the_same_process_is_refused_and_the_first_released_at_the_end(tmp_path):
    with RunLock(str(tmp_path), purpose="training") as first:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (record["pid"], record["host"], record["purpose"]) == (os.getpid(), socket.gethostname(), "training")
        assert record["token"] == first.holder.token and record["started"] and record["command"]
        with pytest.raises(FolderInUse) as refused:
            RunLock(str(tmp_path), purpose="evaluation").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{tmp_path} is in use by another process: training, pid {os.getpid()} on "
                                  f"{socket.gethostname()} since {record['started']} (")
        assert message.endswith(f"; wait for it to end, stop it with `kill {os.getpid()}` or choose another "
                                "--output-dir")
        assert refused.value.holder == first.holder
        assert (tmp_path / LOCK_NAME).exists()  # the refusal left the holder's lock alone
    assert leftovers(tmp_path) == []
    with RunLock(str(tmp_path)):  # free again
        pass


def test_a_run_in_another_process_refuses_the_lock_naming_it(tmp_path):
    (tmp_path / "run").mkdir()
    holder = hold_in_another_process(tmp_path / "run", tmp_path / "signals")
    try:
        with pytest.raises(FolderInUse) as refused:
            RunLock(str(tmp_path / "run")).acquire()
        message = str(refused.value)
        assert f"training, pid {holder.pid} on {socket.gethostname()} since " in message
        assert "(python -c " in message and "from plumbing.run_lock import RunLock" in message  # its command
        assert f"stop it with `kill {holder.pid}`" in message and "choose another --output-dir" in message
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            check_free(str(tmp_path / "run"))
    finally:
        (tmp_path / "signals" / "let-go").touch()
        holder.wait(timeout=30)
    assert holder.returncode == 0, holder.stderr.read()
    assert leftovers(tmp_path / "run") == []  # released as its with block ended
    check_free(str(tmp_path / "run"))


def test_report_refuses_to_draw_beside_a_run(tmp_path):
    with RunLock(str(tmp_path)):
        proc = run_script(REPO / "report.py", [tmp_path])
        assert leftovers(tmp_path) == [LOCK_NAME]  # the refused report left our lock alone
    assert_clean_error(proc.returncode, proc.stderr, f"{tmp_path} is in use by another process: training, pid "
                       f"{os.getpid()}", f"wait for it to end or stop it with `kill {os.getpid()}`")
    assert "--output-dir" not in proc.stderr  # report.py's folder is the run's: no other to choose
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("error", [ValueError("bug"), KeyboardInterrupt(), SystemExit(1)])
def test_the_lock_is_released_however_the_block_ends(tmp_path, error):
    with pytest.raises(type(error)):
        with RunLock(str(tmp_path)):
            assert leftovers(tmp_path) == [LOCK_NAME]
            raise error
    assert leftovers(tmp_path) == []


def test_a_killed_holders_lock_is_taken_over_with_a_line_saying_so(tmp_path):
    (tmp_path / "run").mkdir()
    holder = hold_in_another_process(tmp_path / "run", tmp_path / "signals")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    stale = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert stale["pid"] == holder.pid  # SIGKILL gave it no chance to clean up
    check_free(str(tmp_path / "run"))  # a stale lock does not count
    said = []
    with RunLock(str(tmp_path / "run"), log=said.append):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert leftovers(tmp_path / "run") == [LOCK_NAME]  # no claim file left behind
    assert len(said) == 1
    assert said[0].startswith(f"taking over {tmp_path / 'run'}: its lock {tmp_path / 'run' / LOCK_NAME} is stale, "
                              f"the process that took it is gone (training, pid {holder.pid} on ")


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="needs /proc to tell a reused pid")
def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
    write_lock(tmp_path, pid=os.getppid(), process_start="1")  # a live pid, but started long after the lock's
    said = []
    with RunLock(str(tmp_path), log=said.append):
        pass
    assert len(said) == 1 and f"pid {os.getppid()}" in said[0] and "is gone" in said[0]


def test_a_lock_from_another_machine_is_refused_and_left_alone(tmp_path):
    record = write_lock(tmp_path, host="gpu-node-7", pid=dead_pid())  # its pid means nothing here
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(FolderInUse) as refused:
        RunLock(str(tmp_path)).acquire()
    assert str(refused.value) == (
        f"{tmp_path} is in use by a process on another machine: training, pid {record['pid']} on gpu-node-7 "
        f"since 2024-05-01T10:00:00+02:00 (python train.py --output-dir w); wait for it to end or choose another "
        f"--output-dir; once sure no run on gpu-node-7 uses the folder, delete {tmp_path / LOCK_NAME}")
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    with pytest.raises(FolderInUse, match="another machine"):
        check_free(str(tmp_path))


@pytest.mark.parametrize("text, reason", [(b'{"pid": 12', "not a lock this program wrote"), (b"", "empty"),
                                          (b'{"pid": "12", "host": "x"}', "not a lock this program wrote")])
def test_a_garbled_lock_file_is_held_by_an_unknown_run(tmp_path, text, reason):
    (tmp_path / LOCK_NAME).write_bytes(text)
    with pytest.raises(FolderInUse) as refused:
        RunLock(str(tmp_path)).acquire()
    message = str(refused.value)
    assert message.startswith(f"{tmp_path} is locked by {tmp_path / LOCK_NAME}, which does not say by whom ({reason}")
    assert message.endswith(f"): once sure no run uses the folder, delete {tmp_path / LOCK_NAME}, or choose "
                            "another --output-dir")
    assert refused.value.holder is None and "\n" not in message
    assert (tmp_path / LOCK_NAME).read_bytes() == text


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    said = []
    lock = RunLock(str(tmp_path), log=said.append).acquire()
    replaced = write_lock(tmp_path)  # deleted by hand and taken by another run
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == replaced["token"]
    assert said == [f"{tmp_path / LOCK_NAME} is no longer this run's lock (deleted or taken over by hand): "
                    "left as it is"]


def test_without_hard_links_the_lock_is_created_in_place(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(run_lock.os, "link", no_links)
    with RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.holder.token
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
        assert leftovers(tmp_path) == [LOCK_NAME]  # the temporary file went
    assert leftovers(tmp_path) == []


def test_a_folder_that_is_missing_cannot_be_locked(tmp_path):
    with pytest.raises(CannotLock, match=f"cannot lock {tmp_path / 'nothing'}: there is no such folder"):
        RunLock(str(tmp_path / "nothing")).acquire()


def test_two_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for round_ in range(8):
        signals = tmp_path / f"round{round_}"
        signals.mkdir()
        stale = write_lock(folder, pid=dead_pid())
        racers = [start(RACE, folder, signals / f"ready{i}", signals / "go", signals / f"result{i}", signals / "done")
                  for i in range(2)]
        for i, racer in enumerate(racers):
            wait_for(signals / f"ready{i}", racer)
        (signals / "go").touch()
        for i, racer in enumerate(racers):
            wait_for(signals / f"result{i}", racer)
        outcomes = [(signals / f"result{i}").read_text() for i in range(2)]
        live = json.loads((folder / LOCK_NAME).read_text())
        (signals / "done").touch()
        for racer in racers:
            racer.wait(timeout=30)
            assert racer.returncode == 0, racer.stderr.read()
        won = [i for i, outcome in enumerate(outcomes) if outcome.startswith("won: ")]
        assert len(won) == 1, (round_, outcomes)
        winner, loser = racers[won[0]], racers[1 - won[0]]
        assert live["pid"] == winner.pid
        assert f"taking over {folder}" in outcomes[won[0]] and f"pid {stale['pid']} " in outcomes[won[0]]
        assert outcomes[1 - won[0]].startswith(f"refused: {folder} is in use by another process: training, "
                                               f"pid {winner.pid} "), (round_, outcomes, loser.pid)
        assert leftovers(folder) == []  # released by the winner; no claim or temporary file left


def test_a_takeover_whose_taker_died_half_way_is_taken_over_too(tmp_path):
    stale = write_lock(tmp_path, pid=dead_pid())
    (tmp_path / f"{LOCK_NAME}.takeover-{stale['token']}").write_text(json.dumps(
        dict(stale, pid=dead_pid(), token=uuid.uuid4().hex)))  # killed between its claim and its lock
    said = []
    with RunLock(str(tmp_path), log=said.append):
        assert leftovers(tmp_path) == [LOCK_NAME]
    assert len(said) == 1 and f"pid {stale['pid']} " in said[0]


def test_probe_writable_uses_a_name_of_its_own(tmp_path):
    (tmp_path / ".write-test").mkdir()  # the fixed name the probe once used, taken: no clash
    probe_writable(str(tmp_path))
    assert os.listdir(tmp_path) == [".write-test"]
    with pytest.raises(FileNotFoundError):
        probe_writable(str(tmp_path / "nothing"))


# Two machines of one host name sharing the folder (a cluster's nodes cloned from one image, say): the
# boot id tells two boots apart, not two machines, and both hosts' first pid namespace looks the same.
HERE = dict(boot_id="boot-of-this-machine", machine_id="machine-id-of-this-machine")


@pytest.fixture
def this_machine(monkeypatch):
    """This process runs on a machine with HERE's ids, whatever the test machine's are."""
    monkeypatch.setattr(run_lock, "_boot_id", lambda: HERE["boot_id"])
    monkeypatch.setattr(run_lock, "_machine_id", lambda: HERE["machine_id"], raising=False)


def test_a_lock_records_the_machine_it_was_taken_on(tmp_path, this_machine):
    with RunLock(str(tmp_path)):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (record["boot_id"], record["machine_id"]) == (HERE["boot_id"], HERE["machine_id"])


def test_a_lock_of_another_machine_with_the_same_host_name_is_refused_and_left_alone(tmp_path, this_machine):
    # its pid is dead here, and its boot differs from ours: once judged left over from a reboot and taken
    record = write_lock(tmp_path, pid=dead_pid(), boot_id="boot-of-the-twin", machine_id="machine-id-of-the-twin")
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(FolderInUse) as refused:
        RunLock(str(tmp_path)).acquire()
    host = socket.gethostname()
    assert str(refused.value) == (
        f"{tmp_path} is in use by a process on another machine named {host} (its machine id differs from this "
        f"one's): training, pid {record['pid']} on {host} since 2024-05-01T10:00:00+02:00 (python train.py "
        f"--output-dir w); wait for it to end or choose another --output-dir; once sure no run on {host} uses "
        f"the folder, delete {tmp_path / LOCK_NAME}")
    assert (tmp_path / LOCK_NAME).read_bytes() == before
    with pytest.raises(FolderInUse, match="another machine named"):
        check_free(str(tmp_path))


def test_a_lock_of_this_machine_from_before_a_reboot_is_taken_over(tmp_path, this_machine):
    record = write_lock(tmp_path, pid=os.getppid(), boot_id="an-earlier-boot", machine_id=HERE["machine_id"])
    said = []
    with RunLock(str(tmp_path), log=said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["machine_id"] == HERE["machine_id"]
    assert len(said) == 1 and f"pid {record['pid']} " in said[0] and "is gone" in said[0]


@pytest.mark.parametrize("whose", ["an older lock", "a machine without an id"])
def test_a_lock_from_another_boot_that_no_machine_id_vouches_for_is_refused(tmp_path, monkeypatch, this_machine,
                                                                            whose):
    if whose == "an older lock":  # written before locks recorded the machine: readable, but says less
        write_lock(tmp_path, pid=dead_pid(), boot_id="another-boot")
        reason = "the lock, written by an older version, does not say which machine wrote it"
    else:
        monkeypatch.setattr(run_lock, "_machine_id", lambda: None)
        write_lock(tmp_path, pid=dead_pid(), boot_id="another-boot", machine_id="some-machine-id")
        reason = "this machine has no machine id (/etc/machine-id) to compare with the lock's"
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(FolderInUse) as refused:
        RunLock(str(tmp_path)).acquire()
    host = socket.gethostname()
    message = str(refused.value)
    assert message.startswith(
        f"{tmp_path} is locked by a process on {host} under another boot, either this machine before a restart "
        f"or another machine named {host} ({reason}): training, pid ")
    assert message.endswith(f"; once sure no run on a machine named {host} uses the folder, delete "
                            f"{tmp_path / LOCK_NAME}, or choose another --output-dir")
    assert "\n" not in message and (tmp_path / LOCK_NAME).read_bytes() == before


def test_an_older_lock_of_this_boot_is_still_judged_by_its_pid(tmp_path, this_machine):
    write_lock(tmp_path, pid=dead_pid(), boot_id=HERE["boot_id"])  # no machine_id: the boot id is this one's
    said = []
    with RunLock(str(tmp_path), log=said.append):
        pass
    assert len(said) == 1 and "is gone" in said[0]
    write_lock(tmp_path, boot_id=HERE["boot_id"])  # our own pid: alive
    with pytest.raises(FolderInUse, match=f"is in use by another process: training, pid {os.getpid()} "):
        RunLock(str(tmp_path)).acquire()


def test_the_machine_id_comes_from_the_first_file_that_holds_one(tmp_path, monkeypatch):
    missing, empty, held = tmp_path / "missing", tmp_path / "empty", tmp_path / "held"
    empty.write_text("\n")
    held.write_text("0123456789abcdef\n")
    monkeypatch.setattr(run_lock, "MACHINE_ID_FILES", (str(missing), str(empty), str(held)), raising=False)
    assert run_lock._machine_id() == "0123456789abcdef"
    monkeypatch.setattr(run_lock, "MACHINE_ID_FILES", (str(missing), str(empty)))
    assert run_lock._machine_id() is None


@pytest.mark.skipif(run_lock._boot_id() is None, reason="needs a boot id to tell boots apart")
def test_a_command_refused_by_a_twin_machines_lock_says_so_in_one_line(tmp_path):
    # the real ids of this machine, in a real command: the twin's are made up, so they differ from them
    write_lock(tmp_path, pid=dead_pid(), boot_id="boot-of-the-twin", machine_id="machine-id-of-the-twin")
    proc = run_script(REPO / "report.py", [tmp_path])
    line = assert_clean_error(proc.returncode, proc.stderr, f"delete {tmp_path / LOCK_NAME}")
    assert proc.returncode == FolderInUse.exit_code and proc.stderr.count("\n") == 1
    assert (f"on another machine named {socket.gethostname()}" in line if run_lock._machine_id()
            else "under another boot" in line)
    assert leftovers(tmp_path) == [LOCK_NAME]
