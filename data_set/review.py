"""DIR/review.csv: the decisions of a data review (`python app.py --review --data-path DIR`), one
row each, appended the moment it is made; the last row for a photo counts. No photo is ever moved,
renamed or deleted: train.py, --eval-only and data_set.check read the file, leave the excluded
photos out and use the relabelled ones under their new class (--review off: they ignore it).

    file,action,class,time
    roses/99.jpg,exclude,,2025-01-02T10:11:12Z
    daisy/154.jpg,relabel,tulips,2025-01-02T10:11:15Z
    roses/99.jpg,keep,,2025-01-02T10:12:01Z

file: the photo's path relative to DIR, with /; action: keep, relabel or exclude; class: the new
class of a relabel, empty otherwise; time: when it was decided (UTC). Appending takes a lock on the
file and writes each row with one write to a file opened for appending, so two pages (or two tabs)
deciding at once lose no row and write one header; reading takes the lock shared, so it never sees
half a row. No torch here: the page and its tests import this alone.
"""
import csv
import dataclasses
import io
import os
import posixpath
import time
from dataclasses import dataclass

from plumbing.options import UserError

try:
    import fcntl
except ImportError:  # Windows: O_APPEND alone keeps each row whole; only two first rows at once could both add a header
    fcntl = None

FILE = "review.csv"
FIELDS = ["file", "action", "class", "time"]
ACTIONS = ("keep", "relabel", "exclude")
MODES = ("on", "off")
FIX = "fix or delete that line, or pass --review off to ignore the file"


class ReviewError(UserError):
    """A review.csv that cannot be applied: the message names the file and the line."""


@dataclass(frozen=True)
class Decision:
    """The decision that counts for one photo: the last row that names it."""

    file: str  # relative to DIR, with /
    action: str
    new_class: str  # "" unless relabel
    time: str
    line: int


def path_of(root):
    return os.path.join(root, FILE)


def relative(path, root):
    """The name review.csv gives a photo of root: its path relative to root, with /."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def _bad_name(name):
    parts = name.split("/")
    return not name or posixpath.isabs(name) or "\\" in name or any(p in ("", ".", "..") for p in parts)


def read(root, fix=FIX):
    """{file: Decision} of root/review.csv, the last row of each file; {} when there is no file. A
    row that is not one (fields, action, a relabel without its class, a path that is not a file name
    inside root) is a ReviewError naming its line. Reading never changes the file."""
    path = path_of(root)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # an append in progress finishes its row first
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ReviewError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): {fix}") from None
    reader = csv.reader(io.StringIO(text))
    decisions = {}
    for row in reader:
        line = reader.line_num
        if not row or row == [""]:
            continue  # a blank line
        where = f"{path} line {line}"
        if line == 1:
            if row != FIELDS:
                raise ReviewError(f"{where}: the header must be {','.join(FIELDS)}, not {','.join(row)[:80]}: "
                                  f"{fix}")
            continue
        if len(row) != len(FIELDS):
            raise ReviewError(f"{where}: {len(row)} field(s) where a row has {len(FIELDS)} ({','.join(FIELDS)}): "
                              f"{fix}")
        name, action, new_class, when = (field.strip() for field in row)
        if _bad_name(name):
            raise ReviewError(f"{where}: {name!r} is not a photo's path relative to {root} (like daisy/1.jpg): {fix}")
        if action not in ACTIONS:
            raise ReviewError(f"{where}: unknown action {action!r} (keep, relabel or exclude): {fix}")
        if (action == "relabel") != bool(new_class):
            raise ReviewError(f"{where}: " + ("relabel names no class" if new_class == "" else
                                              f"{action} takes no class (got {new_class!r})") + f": {fix}")
        decisions[name] = Decision(name, action, new_class, when, line)
    return decisions


def check_decisions(decisions, root, classes, fix=FIX):
    """A ReviewError for the first decision that names a file root does not hold or a class that is
    not one of classes; the decisions otherwise."""
    for d in sorted(decisions.values(), key=lambda d: d.line):
        where = f"{path_of(root)} line {d.line}"
        if not os.path.isfile(os.path.join(root, *d.file.split("/"))):
            raise ReviewError(f"{where}: {d.file} is not in {root} (moved, renamed or deleted?): put it back, or {fix}")
        if d.action == "relabel" and d.new_class not in classes:
            raise ReviewError(f"{where}: class {d.new_class!r} is not one of the classes ({', '.join(classes)}): "
                              f"{fix}")
    return decisions


def record_of(decisions):
    """What a checkpoint records of a review: the excluded files and the relabelled ones' classes."""
    return {"file": FILE,
            "excluded": sorted(d.file for d in decisions.values() if d.action == "exclude"),
            "relabelled": {d.file: d.new_class for d in sorted(decisions.values(), key=lambda d: d.file)
                           if d.action == "relabel"}}


def relabel(samples, root, classes, record):
    """(the (path, class index) samples with record applied, excluded, relabelled): excluded photos
    left out, relabelled ones under their new class; excluded and relabelled count those that it
    changed (a relabel to the class a photo already has changes nothing)."""
    out, excluded, relabelled = [], 0, 0
    gone, moved = set(record["excluded"]), record["relabelled"]
    for path, label in samples:
        name = relative(path, root)
        if name in gone:
            excluded += 1
            continue
        if name in moved and classes.index(moved[name]) != label:
            label = classes.index(moved[name])
            relabelled += 1
        out.append((path, label))
    return out, excluded, relabelled


def apply(found, root, mode="on", log=print, resumed=False, recorded=None):
    """found (training.data.FoundData) with root/review.csv applied to its train and val samples,
    after the split, so that a review never moves a photo between train and val; found.review is
    what the checkpoint records (None when no review applies). A resumed run applies what it
    recorded (recorded; None: nothing), whatever the file says now: a run trains on one data set."""
    there = os.path.exists(path_of(root))
    if resumed and recorded is None or not resumed and (mode == "off" or not there):
        if there:
            log(f"review.csv: {path_of(root)} not applied: " + ("this run started without it; a new run "
                                                                  "applies it" if resumed else "--review off"))
        return dataclasses.replace(found, review=None)
    if resumed:
        record, source = recorded, "as recorded when this run started"
    else:
        record, source = record_of(check_decisions(read(root), root, found.classes)), path_of(root)
    train, out_train, moved_train = relabel(found.train, root, found.classes, record)
    val, out_val, moved_val = relabel(found.val, root, found.classes, record)
    log(f"review.csv: {out_train + out_val} excluded, {moved_train + moved_val} relabelled ({source}; "
        f"train {out_train} excluded, {moved_train} relabelled; val {out_val} excluded, {moved_val} relabelled)")
    if found.train:
        had, kept = {k for _, k in found.train}, {k for _, k in train}
        empty = [c for i, c in enumerate(found.classes) if i in had and i not in kept]
        if empty:
            raise ReviewError(f"{path_of(root)} leaves class {empty[0]} without training images: keep or relabel "
                              f"some of its photos, or remove its folder")
    return dataclasses.replace(found, train=train, val=val, review=record)


def append(root, rows, now=None):
    """Append decisions [(file, action, new class or "")] to root/review.csv, making it (with its
    header) if needed; each call's rows go in one write under an exclusive lock, so concurrent
    writers (processes or threads) interleave whole calls and lose nothing. Returns the time written."""
    when = now or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for name, action, new_class in rows:
        if _bad_name(name) or action not in ACTIONS or (action == "relabel") != bool(new_class):
            raise ValueError(f"not a decision: {(name, action, new_class)}")  # the page's bug, not the user's
        writer.writerow([name, action, new_class, when])
    fd = os.open(path_of(root), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
        size = os.fstat(fd).st_size
        head = ",".join(FIELDS) + "\n" if size == 0 else ""
        if size and os.lseek(fd, size - 1, os.SEEK_SET) >= 0 and os.read(fd, 1) != b"\n":
            head = "\n"  # a file edited by hand may end without one: the row must not join its last line
        data = (head + out.getvalue()).encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return when


def latest(decisions, count):
    """The count most recent decisions, the newest first."""
    return sorted(decisions.values(), key=lambda d: d.line, reverse=True)[:count]


def counts(decisions):
    """{action: how many photos have it as their decision}."""
    found = dict.fromkeys(ACTIONS, 0)
    for d in decisions.values():
        found[d.action] += 1
    return found

