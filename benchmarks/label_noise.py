"""Label noise: how many flipped labels the review page's suspect list finds, and what accepting its
suggestions gives back.

    python benchmarks/label_noise.py --data-path ../shared/flower_photos --work /tmp/noise
    python benchmarks/label_noise.py --data-path DIR --fraction 0.05 --accept 100 --epochs 25

DIR is a folder of class folders. train.py's split of it (--val-ratio, --split-seed) is made once;
its val photos, under their own classes, are the holdout of every run. WORK gets two trees of
links to the photos: clean/{train,val}/<class>/, the data as it is, and noisy/{train,val}/<class>/,
where --fraction of each class's training photos (a choice seeded by --noise-seed) sit under
another class, drawn from the others. Then three runs of train.py, each with every option this
script does not take:

    clean     on clean/
    noisy     on noisy/
    reviewed  on noisy/ after the review step: the first --accept rows of the noisy run's
              suspect_labels.csv (the review page's suspect list, in its order) accepted as the
              page records them (relabel to the suggested class where it is not the given one,
              else keep), appended to noisy/review.csv, which train.py applies

and the table: the flipped photos among the first --accept suspects, the accepted relabels that
gave a flipped photo back its true class (or wrongly moved a clean one), and each run's holdout
accuracy (its last epoch's val_accuracy, so that choosing the best epoch on the holdout flatters
none of them). --skip-clean leaves out the clean run.
"""
import argparse
import csv
import os
import random
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from data_set import review  # noqa: E402
from plumbing import options  # noqa: E402
from training import data  # noqa: E402

TRAIN = os.path.join(ROOT, "train.py")
MADE = ("clean", "noisy", "runs")  # what this script makes in WORK, and removes when it starts again


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="a folder of class folders")
    p.add_argument("--work", default="/tmp/googlenet-label-noise",
                   help="where the linked trees and the runs go (its clean/, noisy/ and runs/ are replaced)")
    p.add_argument("--fraction", type=options.open_fraction, default=0.05,
                   help="the share of each class's training photos put under another class")
    p.add_argument("--accept", type=options.positive_int, default=100,
                   help="the suspects whose suggestion the review step accepts, the most suspect first")
    p.add_argument("--noise-seed", type=options.seed, default=0, help="seeds which photos are flipped and where to")
    p.add_argument("--val-ratio", type=options.open_fraction, default=0.1, help="as train.py's")
    p.add_argument("--split-seed", type=options.seed, default=0, help="as train.py's")
    p.add_argument("--skip-clean", action="store_true", help="leave out the clean run")
    return p


def link(source, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.symlink(os.path.abspath(source), target)


def make_trees(root, work, fraction, seed, val_ratio, split_seed):
    """Link WORK/clean and WORK/noisy; {name in noisy/: true class} of the flipped photos."""
    found = data.find_data(root, val_ratio, split_seed, log=lambda line: None)
    classes = found.classes
    rng = random.Random(seed)
    by_class = [[p for p, k in found.train if k == c] for c in range(len(classes))]
    flipped = {}
    for c, paths in enumerate(by_class):
        for path in sorted(rng.sample(paths, round(fraction * len(paths)))):
            flipped[path] = rng.choice([k for k in range(len(classes)) if k != c])
    names = {}
    for part, samples in (("train", found.train), ("val", found.val)):
        for path, label in samples:
            relative = os.path.relpath(path, os.path.join(root, classes[label]))
            link(path, os.path.join(work, "clean", part, classes[label], relative))
            given = flipped.get(path, label) if part == "train" else label
            target = os.path.join(work, "noisy", part, classes[given], relative)
            while os.path.lexists(target):  # the other class has a photo of that name
                stem, ext = os.path.splitext(target)
                target = f"{stem}_moved{ext}"
            link(path, target)
            if path in flipped:
                names[review.relative(target, os.path.join(work, "noisy"))] = classes[label]
    return classes, names


def train(data_path, out, train_args):
    """Run train.py; its holdout accuracy (the last epoch's val_accuracy in metrics.csv)."""
    command = [sys.executable, TRAIN, "--data-path", data_path, "--output-dir", out, "--class-indices",
               os.path.join(out, "class_indices.json"), *train_args]
    print("$ " + " ".join(command[1:]), flush=True)
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(("review.csv:", "data:", "[epoch", "best val")):
            print("  " + line.split("\r")[-1], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return float(list(csv.DictReader(f))[-1]["val_accuracy"])


def accept_suspects(noisy, run, count, flipped):
    """The review step: the first count rows of run/suspect_labels.csv accepted into noisy/review.csv.
    Returns (flipped photos among them, relabels that restored a true class, relabels of clean photos)."""
    with open(os.path.join(run, "suspect_labels.csv"), newline="") as f:
        first = list(csv.DictReader(f))[:count]
    decisions, found, restored, wrong = [], 0, 0, 0
    for row in first:
        name = review.relative(row["file"], noisy)
        found += name in flipped
        if row["suggested_class"] == row["given_class"]:
            decisions.append((name, "keep", ""))
            continue
        decisions.append((name, "relabel", row["suggested_class"]))
        restored += flipped.get(name) == row["suggested_class"]
        wrong += name not in flipped
    review.append(noisy, decisions)
    return len(first), found, restored, wrong


def main(argv=None):
    opts, train_args = get_args_parser().parse_known_args(argv)
    for name in MADE:
        shutil.rmtree(os.path.join(opts.work, name), ignore_errors=True)
    classes, flipped = make_trees(opts.data_path, opts.work, opts.fraction, opts.noise_seed, opts.val_ratio,
                                  opts.split_seed)
    noisy, runs = os.path.join(opts.work, "noisy"), os.path.join(opts.work, "runs")
    print(f"{len(flipped):,} training photos under another class ({opts.fraction:.0%} of each of {len(classes)} "
          f"classes) in {noisy}", flush=True)
    accuracy = {}
    if not opts.skip_clean:
        accuracy["clean"] = train(os.path.join(opts.work, "clean"), os.path.join(runs, "clean"), train_args)
    accuracy["noisy"] = train(noisy, os.path.join(runs, "noisy"), train_args)
    looked, found, restored, wrong = accept_suspects(noisy, os.path.join(runs, "noisy"), opts.accept, flipped)
    accuracy["reviewed"] = train(noisy, os.path.join(runs, "reviewed"), train_args)

    print(f"\nthe first {looked} suspects hold {found} of the {len(flipped)} flipped photos; accepting their "
          f"suggestions gave {restored} flipped photos back their class and relabelled {wrong} clean ones")
    print("| run | holdout accuracy |\n| --- | --- |")
    for run, value in accuracy.items():
        print(f"| {run} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(options.run_command(main, None))
