"""Split an image-folder tree (source/<class>/<images>) into dest/train/<class> and dest/val/<class>.

    python -m data_set.split_data [--source DIR] [--dest DIR] [--val-ratio 0.1] [--seed 0] [--force]

Run from the project's folder (it uses data.py there). The split is data.split_samples, which
train.py also uses on a folder of class folders: the same on every platform for a given seed;
adding or removing one class leaves the split of the others unchanged.
"""
import argparse
import os
import sys

try:
    from plumbing import options
    from training.data import DataError, split_dataset
except ModuleNotFoundError as e:
    if e.name not in ("options", "data"):
        raise
    sys.exit("error: run this from the project's folder as  python -m data_set.split_data --source DIR ...")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "flower_data", "flower_photos")
DEFAULT_DEST = os.path.join(HERE, "flower_data")


def get_args_parser():
    parser = argparse.ArgumentParser(prog="python -m data_set.split_data", description=__doc__.split("\n")[0])
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
