"""Split an image-folder tree (source/<class>/<images>) into dest/train/<class> and dest/val/<class>.

    python -m data_set.split_data [--source DIR] [--dest DIR] [--val-ratio 0.1] [--seed 0] [--force]

The split is training/data.py's split_samples, which
train.py also uses on a folder of class folders: the same on every platform for a given seed;
adding or removing one class leaves the split of the others unchanged.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project's folders, also when run as a file from elsewhere

from plumbing import options  # noqa: E402
from training.data import split_dataset  # noqa: E402

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


def main(args):
    split_dataset(args.source, args.dest, args.val_ratio, args.seed, args.force)
    return 0


def run(argv=None):
    return options.run_command(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
