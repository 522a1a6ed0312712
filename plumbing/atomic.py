"""Files that must survive a crash: every file the project writes goes through atomic_write.

No torch here: predict.py writes its tables with it before (or without) importing torch.
"""
import os
import tempfile

from plumbing.options import UserError

DISK_HINT = "free some disk space, or write it somewhere else"


class SaveError(UserError, OSError):
    """A file that could not be written (a full disk, a read-only folder); str() is the one-line message.

    errno and strerror are those of the failed write; hint says what to do about it.
    """

    exit_code = 1

    def __init__(self, path, error, hint=DISK_HINT):
        OSError.__init__(self, error.errno, error.strerror or str(error))
        self.path, self.hint = path, hint

    def __str__(self):
        return f"cannot write {self.path} ({self.strerror}): {self.hint}"


def atomic_write(path, write, hint=DISK_HINT):
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path.

    A crash at any moment leaves either the old complete file or the new complete one; a failed
    write (a full disk, say) removes the temporary file, keeps the old file untouched and raises
    SaveError with the hint.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; users expect their umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            e = e.__context__  # torch.save reports a failed write (a full disk) as a RuntimeError
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise SaveError(path, e, hint) from e
        raise
    fsync_dir(folder)


def atomic_write_text(path, text, hint=DISK_HINT):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), hint)


def remove_stale_temp_files(folder, names=("best.pth", "last.pth", "class_indices.json", "metrics.csv")):
    """Delete the temporary files of saves that a crash or SIGKILL cut short (never a real file)."""
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(f".{n}.") for n in names):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def fsync_dir(folder):
    """Make a rename or a new file in folder survive a crash (the folder's entry is on disk too)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
