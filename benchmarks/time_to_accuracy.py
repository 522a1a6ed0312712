"""Minutes to accuracy: run train.py and report when its validation accuracy first reached each mark.

    python benchmarks/time_to_accuracy.py --data-path ../shared/flower_photos
    python benchmarks/time_to_accuracy.py --data-path DIR --epochs 100 --output-dir runs/long

Every argument that is not this script's own goes to train.py unchanged (its defaults train the
default recipe). The clock starts when train.py starts, so the minutes include its start-up and the
decoding of the images: the whole `python train.py ...` run, as a user waits for it.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmark import cpu_description  # noqa: E402
from plumbing import options  # noqa: E402

EPOCH_LINE = re.compile(r"\[epoch (\d+)\] .*val_accuracy: ([\d.]+)")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--marks", type=options.probability, nargs="+", default=[0.70, 0.80, 0.85, 0.90],
                   help="validation accuracies to time")
    return p


TRAIN = os.path.join(ROOT, "train.py")


def time_run(train_args, out=sys.stdout, script=TRAIN):
    """Run train.py with train_args; returns (exit code, [(epoch, minutes, accuracy)], total minutes)."""
    cmd = [sys.executable, script, *train_args]
    start = time.perf_counter()
    epochs = []
    # stderr (tqdm's bars: megabytes in a long run) goes to a file: a pipe read only at the end
    # would fill up and stall train.py.
    with tempfile.TemporaryFile("w+") as stderr:
        with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1,
                              env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
            for line in proc.stdout:
                match = EPOCH_LINE.search(line)
                if match:
                    epochs.append((int(match.group(1)), (time.perf_counter() - start) / 60, float(match.group(2))))
                    print(f"{epochs[-1][1]:6.1f} min  epoch {epochs[-1][0]:3d}  val_accuracy {epochs[-1][2]:.3f}",
                          file=out, flush=True)
        stderr.seek(0)
        error = stderr.read()
    if proc.returncode != 0:
        print(error.strip().splitlines()[-1] if error.strip() else f"train.py exited with {proc.returncode}",
              file=sys.stderr)
    return proc.returncode, epochs, (time.perf_counter() - start) / 60


def report_marks(epochs, total, marks, out=sys.stdout):
    print(f"\nwhole run: {total:.1f} min, {len(epochs)} epochs", file=out)
    for mark in marks:
        reached = next(((e, m) for e, m, a in epochs if a >= mark), None)
        print(f"val accuracy >= {mark:.2f}: "
              + (f"{reached[1]:.1f} min (epoch {reached[0]})" if reached else "not reached"),
              file=out)
    if epochs:
        best = max(epochs, key=lambda x: x[2])
        print(f"final {epochs[-1][2]:.3f} (epoch {epochs[-1][0]}); best {best[2]:.3f} (epoch {best[0]}, "
              f"{best[1]:.1f} min)", file=out)


def main(argv=None):
    opts, train_args = get_args_parser().parse_known_args(argv)
    print(f"{cpu_description()}\ncommand: python train.py {' '.join(train_args)}", flush=True)
    code, epochs, total = time_run(train_args)
    report_marks(epochs, total, opts.marks)
    return code


if __name__ == "__main__":
    sys.exit(main())
