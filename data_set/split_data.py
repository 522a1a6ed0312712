"""Split an image-folder tree (source/<class>/<images>) into dest/train/<class> and dest/val/<class>.

    python data_set/split_data.py [--source DIR] [--dest DIR] [--val-ratio 0.1] [--seed 0] [--force]

The split is data.split_samples, which train.py also uses on a folder of class folders: the same on
every platform for a given seed; adding or removing one class leaves the split of the others unchanged.
"""
import argparse
import os
import shutil
import sys

# Run as a script, sys.path[0] is data_set/, not the repo root that holds data.py.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import options  # noqa: E402
from data import DataError, find_classes, list_images, split_samples  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "flower_data", "flower_photos")
DEFAULT_DEST = os.path.join(HERE, "flower_data")


def _is_within(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def split_dataset(source, dest, val_ratio=0.1, seed=0, force=False, log=print):
    """Copy source/<class>/* into dest/{train,val}/<class>/; returns {class: (n_train, n_val)}."""
    if not 0 < val_ratio < 1:
        raise DataError(f"val ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    if not os.path.isdir(source):
        raise DataError(f"source folder {source} does not exist: extract flower_photos.tgz there "
                        "(see data_set/README.md), or pass --source with a folder of class folders")
    classes = find_classes(source)
    samples = list_images(source, classes)
    train_dir, val_dir = outputs = [os.path.join(dest, "train"), os.path.join(dest, "val")]
    for out in outputs:
        # --force deletes these folders, so they must not hold the photos being split; nor may they
        # sit inside the source, where the next run would take them for classes.
        if _is_within(source, out) or _is_within(out, source):
            raise DataError(f"source {source} and output {out} overlap: choose a --dest outside "
                            "the source folder")
        if os.path.exists(out) and not force:
            raise DataError(f"{out} already exists: pass --force to replace it")
    for out in outputs:
        if os.path.exists(out):
            shutil.rmtree(out)  # only train/ and val/: dest may also hold the source photos

    train, val = split_samples(samples, classes, val_ratio, seed)
    for out, part in ((train_dir, train), (val_dir, val)):
        for path, index in part:
            # Keep the path below the class folder, so files in subfolders cannot collide.
            name = classes[index]
            target = os.path.join(out, name, os.path.relpath(path, os.path.join(source, name)))
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(path, target)
            except OSError as e:
                raise DataError(f"cannot copy {path} to {target} ({e.strerror or e}): free some disk space, "
                                "or pass --dest with another folder")
    counts = {name: (sum(1 for _, k in train if k == i), sum(1 for _, k in val if k == i))
              for i, name in enumerate(classes)}

    _log_table(counts, log)
    for name, (_, n_val) in counts.items():
        if n_val == 0:
            log(f"warning: class {name} has a single image, so val has none of it")
    return counts


def _log_table(counts, log):
    rows = [(name, t, v) for name, (t, v) in counts.items()]
    rows.append(("total", sum(t for _, t, _ in rows), sum(v for _, _, v in rows)))
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    log(f"{'class':<{width}}  {'train':>6}  {'val':>6}  {'total':>6}")
    for name, t, v in rows:
        log(f"{name:<{width}}  {t:>6}  {v:>6}  {t + v:>6}")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", metavar="DIR", default=DEFAULT_SOURCE,
                        help="folder of class folders to split (default: %(default)s)")
    parser.add_argument("--dest", metavar="DIR", default=DEFAULT_DEST,
                        help="where train/ and val/ are written (default: %(default)s)")
    parser.add_argument("--val-ratio", metavar="R", type=options.open_fraction, default=0.1,
                        help="share of each class that goes to val, between 0 and 1 (default: %(default)s)")
    parser.add_argument("--seed", metavar="N", type=options.seed, default=0,
                        help="seed of the shuffle; the same seed gives the same split (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="delete an existing dest/train and dest/val first instead of refusing")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        split_dataset(args.source, args.dest, args.val_ratio, args.seed, args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
