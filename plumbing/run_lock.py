"""One process at a time writes into a run's folder: a lock file, FOLDER/.lock, held for the run.

    with RunLock(folder, purpose="training", log=print):
        ...  # the run: nothing else writes into folder until the block ends, however it ends

A second taker is refused with FolderInUse, one line naming the holder (pid, host, since when, its
command) and what to do. A lock whose process is gone (killed with SIGKILL, the machine rebooted) is
taken over with a line through log saying so; one written on another machine, or in another pid
namespace (a container), is never taken over, since its process cannot be seen from here: the message
says how to clear it. Machines are told apart by their machine id (/etc/machine-id), not only by
host name: two machines of one name may share the folder (cloned nodes on a network file system),
and a lock from another boot is taken over only when its machine id is this machine's. A lock that
cannot say (written before locks recorded the machine, or on a machine without an id) is refused
with a line saying how to clear it. Where neither boot nor machine ids exist (no /proc, no
machine-id), the host name is all there is to go by.

Short commands that write beside a run (train.py --eval-only, report.py) take the same lock for
their duration with their own purpose, so a training refuses them and they refuse to start beside one;
check_free() only looks, for an early refusal before slow work.

Under torchrun one process holds the lock for all of them: rank 0 takes it, the others do not call
acquire (release() of a lock never acquired does nothing), e.g.

    lock = RunLock(args.output_dir, purpose="training", log=log)
    distributed.run_on_main(device, lock.acquire)  # rank 0's FolderInUse reaches every process
    try: ... finally: lock.release()

Files written next to the run's own (curves.png, .tmp files of a save) must be cleared or written
only while the lock is held: a stale-temp-file sweep before it would delete a live run's half-written
save. No torch here.
"""
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Optional

from plumbing.atomic import fsync_dir
from plumbing.options import UserError

LOCK_NAME = ".lock"
OTHER_FOLDER = "choose another --output-dir"
# systemd's file, then D-Bus's older one (the same id where both exist)
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")

# os.link fails with these where the file system has no hard links (FAT, exFAT, some network shares)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_REREADS = 5  # a lock created in place (no hard links) may be read before its text is in: look again
_TAKEOVER_TRIES = 100


class FolderInUse(UserError):
    """Another process holds the folder's lock (or a lock nobody here can vouch for); str() is the one
    line naming it and what to do. holder is its LockHolder, None for an unreadable lock file."""

    exit_code = 1

    def __init__(self, message, holder=None):
        super().__init__(message)
        self.holder = holder


class CannotLock(UserError):
    """The lock file itself cannot be written (no such folder, no permission, a full disk)."""

    exit_code = 1


@dataclass(frozen=True)
class LockHolder:
    """What a lock file records: who holds the folder, and enough to tell whether it still runs."""

    pid: int
    host: str
    started: str  # local time, ISO 8601
    command: str
    purpose: str  # "training", "evaluation", "report": what the holder does in the folder
    token: str  # unique per lock taken: release and takeover remove only the very lock they judged
    process_start: Optional[str] = None  # /proc/PID/stat start time: a reused pid is another process
    boot_id: Optional[str] = None  # a lock from before a reboot is stale whatever its pid
    pid_namespace: Optional[str] = None  # a container's pids are not ours: never judged from here
    machine_id: Optional[str] = None  # which machine of that host name (None: written before it was recorded)

    def to_json(self):
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, data):
        record = json.loads(data)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        holder = cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})
        if not isinstance(holder.pid, int) or not all(
                isinstance(getattr(holder, name), str) for name in ("host", "started", "command", "purpose", "token")):
            raise ValueError("fields of the wrong type")
        return holder

    def describe(self):
        """'training, pid 4242 on gpu-01 since 2024-05-01T10:00:00+02:00 (python train.py ...)'"""
        command = self.command.replace("\r", "\\r").replace("\n", "\\n")  # the message stays one line
        return f"{self.purpose}, pid {self.pid} on {self.host} since {self.started} ({command})"


class RunLock:
    """The lock on folder for one run (or one short command): acquire() / release(), or a with block.

    purpose names what the holder does, for the message a second taker gets. log receives the one
    line said when a stale lock is taken over. instead is the alternative the refusal offers besides
    waiting or stopping the holder (None: none; report.py's folder is not its choice). The folder
    must exist. Only the process that acquired it releases it: a forked child leaving a with block
    does not.
    """

    def __init__(self, folder, purpose="training", log=print, instead=OTHER_FOLDER):
        self.folder, self.purpose, self.log, self.instead = folder, purpose, log, instead
        self.path = os.path.join(folder, LOCK_NAME)
        self.holder = None  # our LockHolder while held

    def acquire(self):
        """Take the lock, or raise FolderInUse (held by a live process, elsewhere, or unreadable) or
        CannotLock. Returns self."""
        if self.holder is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        mine = _new_holder(self.purpose)
        try:
            for _ in range(_TAKEOVER_TRIES):
                if _create(self.path, mine):
                    self.holder = mine
                    return self
                stale = _stale_holder(self.folder, self.instead)
                if stale is None:
                    continue  # released since: try again
                if _take_over(self.path, stale, mine):
                    self.holder = mine
                    self.log(takeover_message(self.folder, self.path, stale))
                    return self
                time.sleep(0.02)  # another process is taking the stale lock over: its lock decides
        except OSError as e:
            if not os.path.isdir(self.folder):
                raise CannotLock(f"cannot lock {self.folder}: there is no such folder") from e
            raise CannotLock(f"cannot lock {self.folder}: writing {self.path} failed ({e.strerror or e}): "
                             "the folder must be writable, with some free space") from e
        raise FolderInUse(f"{self.folder} keeps changing hands: other processes are starting in it; "
                          f"wait for them{' or ' + self.instead if self.instead else ''}")

    def release(self):
        """Remove the lock if it is still ours (a no-op when not held, or in another process)."""
        holder, self.holder = self.holder, None
        if holder is None or holder.pid != os.getpid():
            return
        if not _remove_if_holds(self.path, holder.token):
            self.log(f"{self.path} is no longer this run's lock (deleted or taken over by hand): left as it is")

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def check_free(folder, instead=OTHER_FOLDER):
    """Raise FolderInUse if a live process holds folder's lock, as RunLock would, without taking it
    or touching a stale one: a quick refusal before slow work. Taking the lock is still what counts."""
    _stale_holder(folder, instead)


def _stale_holder(folder, instead):
    """The holder of folder's lock if its process is gone; None if there is no lock. FolderInUse
    if the holder runs, cannot be seen from here, or the lock file does not say who it is."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        holder = _read(path)
    except _Unreadable as e:
        raise FolderInUse(unreadable_message(folder, path, e.reason, instead)) from None
    if holder is None:
        return None
    state = _state(holder)
    if state is _ALIVE:
        raise FolderInUse(in_use_message(folder, holder, instead), holder)
    if state in (_ANOTHER_HOST, _SAME_NAME, _CONTAINER):
        raise FolderInUse(elsewhere_message(folder, path, holder, instead, state), holder)
    if state is _UNSURE:
        raise FolderInUse(unsure_message(folder, path, holder, instead), holder)
    return holder


def probe_writable(folder):
    """Prove folder writable (and not full) with a file of a unique name, so that two processes never
    clash; raises the OSError of the failed write. The file is gone afterwards."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-", suffix=".tmp") as f:
        f.write(b"ok")
        f.flush()
        os.fsync(f.fileno())  # a full disk may only say so here


# ---------------------------------------------------------------------------------------------
# The messages
# ---------------------------------------------------------------------------------------------
def _choices(*options):
    options = [o for o in options if o]
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


def in_use_message(folder, holder, instead=OTHER_FOLDER):
    return (f"{folder} is in use by another process: {holder.describe()}; "
            + _choices("wait for it to end", f"stop it with `kill {holder.pid}`", instead))


def elsewhere_message(folder, path, holder, instead=OTHER_FOLDER, state=None):
    where = {_ANOTHER_HOST: "on another machine",
             _SAME_NAME: f"on another machine named {holder.host} (its machine id differs from this one's)",
             _CONTAINER: "in another container"}[state or _state(holder)]
    return (f"{folder} is in use by a process {where}: {holder.describe()}; "
            + _choices("wait for it to end", instead)
            + f"; once sure no run on {holder.host} uses the folder, delete {path}")


def unreadable_message(folder, path, reason, instead=OTHER_FOLDER):
    return (f"{folder} is locked by {path}, which does not say by whom ({reason}): once sure no run "
            f"uses the folder, delete {path}{', or ' + instead if instead else ''}")


def unsure_message(folder, path, holder, instead=OTHER_FOLDER):
    """A lock of this host name from another boot that no machine id vouches for."""
    reason = ("the lock, written by an older version, does not say which machine wrote it" if not holder.machine_id
              else "this machine has no machine id (/etc/machine-id) to compare with the lock's")
    return (f"{folder} is locked by a process on {holder.host} under another boot, either this machine before a "
            f"restart or another machine named {holder.host} ({reason}): {holder.describe()}; once sure no run on "
            f"a machine named {holder.host} uses the folder, delete {path}{', or ' + instead if instead else ''}")


def takeover_message(folder, path, holder):
    return f"taking over {folder}: its lock {path} is stale, the process that took it is gone ({holder.describe()})"


# ---------------------------------------------------------------------------------------------
# The lock file
# ---------------------------------------------------------------------------------------------
class _Unreadable(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# what a lock's holder is to this process: running, gone, or out of sight (on another machine, one of
# the same host name, in another container), or from another boot of a machine it cannot name
_ALIVE, _GONE, _ANOTHER_HOST, _SAME_NAME, _CONTAINER, _UNSURE = (
    "alive", "gone", "another host", "same name", "container", "unsure")


def _new_holder(purpose):
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = os.path.basename(argv[0])
    return LockHolder(pid=os.getpid(), host=socket.gethostname(),
                      started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      command=shlex.join(argv), purpose=purpose, token=uuid.uuid4().hex,
                      process_start=_process_stat(os.getpid())[1], boot_id=_boot_id(),
                      pid_namespace=_pid_namespace("self"), machine_id=_machine_id())


def _create(path, holder, over_dead=False):
    """Write holder to path unless path exists: True if this call wrote it. The text goes to a
    temporary file first, which os.link puts in place only whole, and only if path is not there.
    over_dead: path holds a dead holder's lock that this process alone may replace (see _take_over):
    os.replace swaps it for ours at once, so that path is never missing for a newcomer to take."""
    data = holder.to_json().encode("utf-8")
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: others may read who holds the folder
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if over_dead:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                return _create_in_place(path, data)
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass
    fsync_dir(folder)
    return True


def _create_in_place(path, data):
    """_create where hard links are missing: O_EXCL still lets only one process create path, but a
    reader may see it before its text is in (_read looks again)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(path) or ".")
    return True


def _read(path):
    """The LockHolder path records; None if there is no such file; _Unreadable if it records none."""
    for attempt in range(_REREADS):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _Unreadable(f"cannot read it: {e.strerror or e}") from None
        try:
            return LockHolder.from_json(data.decode("utf-8"))
        except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = "empty" if not data.strip() else f"not a lock this program wrote: {e}"
        if attempt + 1 < _REREADS:
            time.sleep(0.1)
    raise _Unreadable(reason)


def _remove_if_holds(path, token):
    """Delete path if it records token: True if it did (or path held it and is gone already)."""
    try:
        current = _read(path)
    except _Unreadable:
        return False
    if current is None or current.token != token:
        return False
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return True


def _take_over(path, dead, mine):
    """Replace path, which records the dead holder, by mine: True if this process did.

    Of the processes that found the same dead holder only one may remove its lock, or a slow one
    would remove the fresh lock of a faster one: each must first create path.takeover-TOKEN (TOKEN:
    the dead holder's), which only one can. Whoever holds that claim and still finds the dead
    holder's token in path puts its own lock in its place.
    A claim whose taker died is itself taken over the same way.
    """
    claim = f"{path}.takeover-{dead.token}"
    if not _create(claim, mine):
        try:
            rival = _read(claim)
        except _Unreadable:
            return False
        if rival is None or _state(rival) is not _GONE or not _take_over(claim, rival, mine):
            return False  # another process is taking over, or has done so (its lock decides)
    try:
        try:
            current = _read(path)
        except _Unreadable:
            return False
        if current is None or current.token != dead.token:
            return False  # someone took it over before us
        return _create(path, mine, over_dead=True)  # no one else removes the dead lock: we hold its claim
    finally:
        _remove_if_holds(claim, mine.token)


def _state(holder):
    """_ALIVE, _GONE (its process ended: the lock is stale), _ANOTHER_HOST, _SAME_NAME, _CONTAINER (its
    process cannot be seen from here) or _UNSURE (another boot, of this machine or of another one of
    its name: nothing tells which)."""
    if holder.host != socket.gethostname():
        return _ANOTHER_HOST
    boot, machine = _boot_id(), _machine_id()
    # A boot id is random per boot: the same one is this very machine. Otherwise only the machine id
    # tells a reboot of this machine from another machine of this name, whose processes are not ours.
    if not (holder.boot_id and holder.boot_id == boot):
        if holder.machine_id and machine and holder.machine_id != machine:
            return _SAME_NAME
        if holder.boot_id and boot:  # boots differ
            return _GONE if holder.machine_id and holder.machine_id == machine else _UNSURE
    if holder.pid_namespace and _pid_namespace("self") and holder.pid_namespace != _pid_namespace("self"):
        return _CONTAINER
    if os.name == "nt":
        return _ALIVE  # os.kill would terminate the process: cannot tell, so never take it over
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return _GONE
    except PermissionError:
        pass  # another user's process: it exists
    state, start = _process_stat(holder.pid)
    if state in ("Z", "X"):
        return _GONE  # ended; only its exit status waits for its parent
    if holder.process_start and start and start != holder.process_start:
        return _GONE  # the pid now belongs to a process started later
    return _ALIVE


def _process_stat(pid):
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat; (None, None) without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None, None
    fields_after_name = text.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    if len(fields_after_name) < 20:
        return None, None
    return fields_after_name[0], fields_after_name[19]


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _machine_id():
    """This machine's id, from the first of MACHINE_ID_FILES that holds one; None without any."""
    for path in MACHINE_ID_FILES:
        try:
            with open(path) as f:
                machine = f.read().strip()
        except OSError:
            continue
        if machine:
            return machine
    return None


def _pid_namespace(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
