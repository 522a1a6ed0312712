"""Find duplicate photos in a data set: exact copies (the same bytes) and near copies (the same
picture resized, recompressed or lightly edited), and whether they leak from train into val or
carry conflicting labels.

    python -m data_set.check DIR                       # the report
    python -m data_set.check DIR --output groups.csv   # and every group, file by file

DIR is what train.py's --data-path takes: a folder of class folders (DIR/<class>/<images>), split
here exactly as train.py splits it (--val-ratio, --split-seed), or a split made beforehand
(DIR/train/<class>/, DIR/val/<class>/). A class folder without images is reported with the rest,
and the command then exits with train.py's error for it (EXIT_STATUS). Each file is read once: the
files whose size another file shares have their bytes hashed (BLAKE2b), and every file is decoded
at a reduced scale for its perceptual hash (near_hash). Near pairs are found with a multi-index
search over bands of the hashes, not by comparing every pair.
"""
import argparse
import csv
import hashlib
import io
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_set import review
from inference import images
from inference.images import HASH_DECODE_SIDE, hash_distance, near_hash, near_pairs, search_plan
from inference.images import NEAR_COPY_BITS as DEFAULT_THRESHOLD
from plumbing import options
from plumbing.atomic import atomic_write_text
from plumbing.options import UserError
from training import data

MAX_THRESHOLD = 32  # two unrelated photos differ in about 32 of the 64 bits
CHUNK = 32  # files per task of the thread pool: one future per file would cost more than a small file's hash
LISTED = 10  # groups shown per kind of problem; --output lists them all
CSV_FIELDS = ["group", "kind", "file", "class", "part", "distance"]
EXIT_STATUS = ("exit status: 0 whatever copies and unreadable files the report finds; 2 after the whole report "
               "when a class folder holds no image (train.py stops at it), or at once for a missing folder, one "
               "without class folders, or a bad option")


# ---------------------------------------------------------------------------------------------
# Near groups: the photos that near pairs (images.near_pairs) link
# ---------------------------------------------------------------------------------------------
def _component_labels(count, pairs):
    """For each of range(count), the smallest index of its connected component in the graph of these edges."""
    parent = list(range(count))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(x) for x in range(count)]


# ---------------------------------------------------------------------------------------------
# Reading and hashing the files
# ---------------------------------------------------------------------------------------------
@dataclass
class Photo:
    """One image file of the data and what hashing it found."""

    path: str
    label: int  # class index
    part: str  # "train" or "val"
    size: int = -1  # bytes
    digest: Optional[bytes] = None  # BLAKE2b of the bytes, only when decoded and another file has the same size
    near: Optional[int] = None  # near_hash; None when the file could not be decoded
    width: int = 0
    height: int = 0
    error: Optional[str] = None  # why it could not be read or decoded


def _hash_photo(photo, with_digest):
    try:
        with open(photo.path, "rb") as f:
            raw = f.read()
    except OSError as e:
        photo.error = f"{type(e).__name__}: {e.strerror or e}"
        return
    try:
        with Image.open(io.BytesIO(raw)) as img:
            photo.width, photo.height = img.size
        photo.near = near_hash(images.load_image(io.BytesIO(raw), min_side=HASH_DECODE_SIDE))
    except Exception as e:  # Pillow raises many kinds for a bad file; any of them means the same here
        photo.error = images.unreadable(photo.path) or f"{type(e).__name__}: {e}"
        return  # no picture, so no copy of one: byte-identical bad files (empty ones, say) are no group
    if with_digest:
        photo.digest = hashlib.blake2b(raw, digest_size=16).digest()


def _hash_chunk(chunk):
    for photo, with_digest in chunk:
        _hash_photo(photo, with_digest)
    return len(chunk)


def hash_photos(photos, workers=2, progress=True):
    """Fill in each photo's size, digest, near hash and pixel size, on workers threads (Pillow
    releases the GIL while it decodes). Files are grouped by size first, so only the files whose
    size another file shares have their bytes hashed; every file is read once. A photo whose near
    hash is filled in already (from the review page's cache) is read again only for a digest that
    a file of the same size now asks for."""
    for photo in photos:
        try:
            photo.size = os.stat(photo.path).st_size
        except OSError as e:
            photo.error = f"{type(e).__name__}: {e.strerror or e}"
    sizes = Counter(p.size for p in photos if p.error is None)
    tasks = [(p, sizes[p.size] > 1) for p in photos
             if p.error is None and (p.near is None or sizes[p.size] > 1 and p.digest is None)]
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(tasks), desc="hashing", unit="photo", file=sys.stderr, disable=not progress) as bar:
        for done in pool.map(_hash_chunk, chunks):
            bar.update(done)


# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Photos that are one picture: identical bytes (exact) or within the threshold (near).
    distances: each photo's bits from the first photo's near hash (0 for an exact group)."""

    kind: str
    photos: list
    distances: list

    @property
    def crosses_split(self):
        return len({p.part for p in self.photos}) > 1

    @property
    def spans_classes(self):
        return len({p.label for p in self.photos}) > 1


def exact_groups(photos):
    by_digest = {}
    for p in photos:
        if p.digest is not None:
            by_digest.setdefault(p.digest, []).append(p)
    groups = [Group("exact", sorted(g, key=lambda p: p.path), [0] * len(g)) for g in by_digest.values() if len(g) > 1]
    return sorted(groups, key=lambda g: g.photos[0].path)


def near_groups(photos, threshold):
    """Groups of photos whose near hashes link within threshold bits, directly or through others,
    holding at least two different files (byte-identical copies alone are an exact group); exact
    copies of a member are members too."""
    decoded = [p for p in photos if p.near is not None]
    if not decoded:
        return []
    # Files with the same hash are one node of the search: the pairs are found among distinct hashes.
    distinct, node = np.unique(np.array([p.near for p in decoded], dtype=np.uint64), return_inverse=True)
    i, j, _ = near_pairs(distinct, threshold)
    label = _component_labels(len(distinct), zip(i.tolist(), j.tolist(), strict=True))
    members = {}
    for photo, n in zip(decoded, node.tolist(), strict=True):
        members.setdefault(label[n], []).append(photo)
    groups = []
    for group in members.values():
        if len({p.digest or p.path for p in group}) > 1:  # a file without a digest has a size of its own
            group.sort(key=lambda p: p.path)
            groups.append(Group("near", group, [hash_distance(p.near, group[0].near) for p in group]))
    return sorted(groups, key=lambda g: g.photos[0].path)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def hamming_threshold(text):
    value = options.non_negative_int(text)
    if value > MAX_THRESHOLD:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THRESHOLD} bits (unrelated photos differ in "
                                         f"about 32), got {text}")
    return value


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m data_set.check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=EXIT_STATUS)
    p.add_argument("data", metavar="DIR", help=f"the data: {data.LAYOUTS}")
    p.add_argument("--threshold", metavar="BITS", type=hamming_threshold, default=DEFAULT_THRESHOLD,
                   help="near copies: the most bits in which two photos' 64-bit perceptual hashes may differ "
                        "(0: only the same hash)")
    p.add_argument("--output", metavar="FILE.csv", default=None,
                   help="also write every group, one row per file (group, kind, file, class, part, distance)")
    p.add_argument("--workers", metavar="N", type=options.positive_int, default=2,
                   help="threads that read, decode and hash the photos")
    p.add_argument("--val-ratio", metavar="R", type=options.open_fraction, default=0.1,
                   help="for a folder of class folders: the share of each class train.py holds out for val")
    p.add_argument("--split-seed", metavar="N", type=options.seed, default=0,
                   help="for a folder of class folders: the seed of train.py's split")
    p.add_argument("--review", default="on", choices=review.MODES,
                   help="DIR/review.csv (python app.py --review): on checks the photos as train.py trains them, "
                        "without the excluded ones and with the relabelled ones under their new class; off: as "
                        "the folders have them")
    return p


@dataclass
class Found:
    """The photos of a data folder with the class and part train.py gives them."""

    classes: list
    photos: list
    how: str  # a line saying which layout and split that is
    empty: list  # the class folders that hold no image (train.py stops at the first): reported with the rest


def find_photos(root, val_ratio=0.1, split_seed=0, review_mode="off", log=lambda line: None, recorded_split=None):
    """The Found photos of root (with review_mode on, after root/review.csv, as train.py applies it;
    recorded_split: a run's split of root, used as it was)."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist: DIR is {data.LAYOUTS}")
    data.find_classes(root)  # a folder without folders: its own line, not train.py's --data-path hint
    found = data.find_data(root, val_ratio, split_seed, recorded_split, log=lambda line: None, allow_empty=True)
    counts = Counter(label for _, label in found.train + found.val) if found.split else Counter(
        [(label, "train") for _, label in found.train] + [(label, "val") for _, label in found.val])
    if found.split:  # one folder per class, split here
        empty = [os.path.join(root, name) for label, name in enumerate(found.classes) if not counts[label]]
    else:  # a folder per class in train/ and in val/
        empty = [os.path.join(root, part, name) for part in ("train", "val")
                 for label, name in enumerate(found.classes) if not counts[label, part]]
    found = review.apply(found, root, review_mode, log)
    photos = ([Photo(path, label, "train") for path, label in found.train]
              + [Photo(path, label, "val") for path, label in found.val])
    how = (f"a folder of class folders, split as train.py splits it (val ratio {found.split['val_ratio']}, "
           f"split seed {found.split['seed']})" if found.split else "a split (train/ and val/)")
    return Found(found.classes, photos, how, empty)


def check(args, log=print):
    """Hash the photos of args.data and group the copies: (Found, exact groups, near groups)."""
    if args.output and not args.output.lower().endswith(".csv"):
        raise UserError(f"--output {args.output}: the file name must end in .csv")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UserError(f"--output {args.output}: the folder {os.path.dirname(args.output)} does not exist")
    found = find_photos(args.data, args.val_ratio, args.split_seed, args.review, log)
    photos = found.photos
    log(f"data: {args.data}: {found.how}")
    start = time.perf_counter()
    hash_photos(photos, args.workers)
    hashed = time.perf_counter()
    exact, near = exact_groups(photos), near_groups(photos, args.threshold)
    searched = time.perf_counter()
    decoded = sum(p.near is not None for p in photos)
    bands, radius = search_plan(len({p.near for p in photos if p.near is not None}), args.threshold)
    each = 1e3 * (hashed - start) / max(len(photos), 1)  # every class folder may be empty
    log(f"hashed {len(photos):,} photos in {hashed - start:.1f} s ({each:.2f} ms "
        f"a photo, {args.workers} thread(s)); compared {decoded:,} hashes in {searched - hashed:.2f} s "
        f"({bands} band(s), radius {radius})")
    return found, exact, near


def _count_table(classes, photos, log):
    counts = Counter((p.label, p.part) for p in photos)
    rows = [(name, counts[i, "train"], counts[i, "val"]) for i, name in enumerate(classes)]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    log(f"{'class':<{width}}  {'train':>7}  {'val':>7}  {'total':>7}")
    for name, train, val in rows:
        log(f"{name:<{width}}  {train:>7,}  {val:>7,}  {train + val:>7,}")


def _sizes_line(photos):
    decoded = [p for p in photos if p.near is not None]
    if not decoded:
        return "image sizes: no photo could be decoded"
    common = Counter((p.width, p.height) for p in decoded).most_common(3)
    short = [min(p.width, p.height) for p in decoded]
    return ("image sizes: most common " + ", ".join(f"{w}x{h} ({n:,})" for (w, h), n in common)
            + f"; shorter side {min(short)}-{max(short)} px (median {statistics.median(short):g})")


def _summary(kind, groups, what):
    files = sum(len(g.photos) for g in groups)
    return (f"{kind} ({what}): {len(groups):,} group(s) of {files:,} files: "
            f"{sum(g.crosses_split for g in groups):,} cross train/val, {sum(g.spans_classes for g in groups):,} "
            f"span classes, {sum(not g.crosses_split and not g.spans_classes for g in groups):,} "
            "stay in one class and one part")


def report(root, found, groups, threshold, log=print):
    """The report's lines after the hashing: counts, sizes, unreadable files, empty class folders, the
    groups and what they mean."""
    classes, photos = found.classes, found.photos
    _count_table(classes, photos, log)
    if data.not_sure_class(classes):
        log(f"class names: {data.not_sure_class(classes)}: train.py refuses it; rename the folder")
    log(_sizes_line(photos))
    bad = [p for p in photos if p.error is not None]
    log(f"unreadable: {len(bad):,} file(s)" + (":" if bad else ""))
    for p in bad[:LISTED]:
        log(f"  {os.path.relpath(p.path, root)} ({p.error})")
    if len(bad) > LISTED:
        log(f"  ... and {len(bad) - LISTED:,} more")
    log(f"empty class folders: {len(found.empty):,}"
        + (": " + ", ".join(os.path.relpath(folder, root) for folder in found.empty) if found.empty else ""))
    exact = [g for g in groups if g.kind == "exact"]
    near = [g for g in groups if g.kind == "near"]
    log(_summary("exact copies", exact, "identical bytes"))
    log(_summary("near copies", near, f"perceptual hashes within {threshold} bits, not all identical"))
    val = sum(p.part == "val" and p.error is None for p in photos)  # the photos a val accuracy counts
    leaked = {id(p) for g in groups if g.crosses_split for p in g.photos if p.part == "val"}
    log(f"leakage: {len(leaked):,} of {val:,} val photos ({100 * len(leaked) / max(val, 1):.1f}%) have an exact "
        "or near copy in train")
    ids = {id(g): k for k, g in enumerate(groups, 1)}
    for title, chosen in (("crossing train/val", [g for g in groups if g.crosses_split]),
                          ("conflicting labels (one picture in several classes)",
                           [g for g in groups if g.spans_classes])):
        log(f"{title}: {len(chosen):,} group(s)" + (":" if chosen else ""))
        for g in chosen[:LISTED]:
            log(f"  group {ids[id(g)]} ({g.kind}): " + ", ".join(
                f"{os.path.relpath(p.path, root)} ({classes[p.label]}, {p.part}"
                + (f", {d} bits" if g.kind == "near" and k else "") + ")"
                for k, (p, d) in enumerate(zip(g.photos, g.distances, strict=True))))
        if len(chosen) > LISTED:
            log(f"  ... and {len(chosen) - LISTED:,} more: --output FILE.csv lists every group")


def write_groups_csv(path, classes, groups):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for k, g in enumerate(groups, 1):
        for p, d in zip(g.photos, g.distances, strict=True):
            writer.writerow([k, g.kind, p.path, classes[p.label], p.part, d])
    atomic_write_text(path, out.getvalue())


def main(args):
    found, exact, near = check(args)
    groups = exact + near
    report(args.data, found, groups, args.threshold)
    if args.output:
        write_groups_csv(args.output, found.classes, groups)
        print(f"{len(groups):,} group(s) written to {args.output}")
    if found.empty:  # the report is whole; the exit says train.py would stop at this folder
        raise data.no_images_error(found.empty)
    return 0


def run(argv=None):
    return options.run_command(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
