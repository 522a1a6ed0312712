"""Draw what a run learned and what its network sees, as PNG files.

    python report.py weights                     # curves, confusion matrix, top losses, reliability, suspect labels
    python report.py --weights weights/best.pth --feature-maps tulip.jpg --layer inception3a
    python report.py --weights weights/best.pth --filters       # conv1's 64 kernels

The run's files come from train.py (metrics.csv each epoch, suspect_labels.csv at the end;
confusion_matrix.csv and predictions.csv from --eval-only, whose probabilities are calibrated with
the weights' temperature: the reliability diagram and the accuracy against coverage are drawn from
them); the pictures of the network come from inference/visualize.py.
"""
import argparse
import csv
import itertools
import os
import sys

from plumbing import options
from plumbing.atomic import atomic_write
from plumbing.options import UserError
from plumbing.run_lock import RunLock

MISSING = "plotting needs matplotlib, an optional dependency: pip install matplotlib"


def get_args_parser():
    p = argparse.ArgumentParser(description="Draw a run's curves (metrics.csv), confusion matrix "
                                            "(confusion_matrix.csv), worst-classified images, reliability diagram "
                                            "and accuracy against coverage (predictions.csv) to PNG files beside "
                                            "them; or, with --weights, a layer's feature maps or conv1's filters.",
                                formatter_class=options.HelpFormatter)
    p.add_argument("folder", nargs="?", default="weights", help="the run's --output-dir")
    p.add_argument("--top-losses", type=options.non_negative_int, default=16,
                   help="how many of the highest-loss val images top_losses.png shows (0: none)")
    p.add_argument("--suspect-labels", type=options.non_negative_int, default=16,
                   help="how many of the training photos whose label is least likely (suspect_labels.csv) "
                        "suspect_labels.png shows (0: none)")
    p.add_argument("--weights", default=None, help="a checkpoint from train.py, for --feature-maps and --filters")
    p.add_argument("--feature-maps", default=None, metavar="PHOTO",
                   help="draw the first --channels output maps of --layer for this photo")
    p.add_argument("--layer", default="inception3a",
                   help="the stage whose maps --feature-maps draws (conv1 ... inception5b)")
    p.add_argument("--channels", type=options.positive_int, default=16, help="how many of the layer's channels to draw")
    p.add_argument("--filters", action="store_true", help="draw conv1's 7x7 kernels as colour tiles")
    p.add_argument("--output", default=None,
                   help="the PNG of --feature-maps or --filters "
                        "(default: feature_maps_<layer>.png or conv1_filters.png)")
    return p


def save_png(fig, path):
    """fig as a PNG file, written atomically (a full disk raises atomic.SaveError, a UserError)."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot(folder, top_losses=16, suspect_labels=16):
    """Draw folder/metrics.csv as loss and accuracy curves, folder/confusion_matrix.csv, the
    top_losses images of folder/predictions.csv with the highest loss, and the first suspect_labels
    photos of folder/suspect_labels.csv."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(MISSING) from None
    written = []
    metrics_path = os.path.join(folder, "metrics.csv")
    if os.path.exists(metrics_path):
        with open(metrics_path, newline="") as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", label="train")
        ax_loss.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", label="val")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_loss.legend()
        trained = [(e, float(r["train_accuracy"])) for e, r in zip(epochs, rows) if r.get("train_accuracy")]
        if trained:  # not with MixUp/CutMix, whose targets are mixtures
            ax_acc.plot(*zip(*trained), "o-", label="train", color="tab:blue")
        ax_acc.plot(epochs, [float(r["val_accuracy"]) for r in rows], "o-", label="val", color="tab:orange")
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
        ax_acc.legend()
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(os.path.join(folder, "curves.png"))
        save_png(fig, written[-1])
    confusion_path = os.path.join(folder, "confusion_matrix.csv")
    if os.path.exists(confusion_path):
        with open(confusion_path, newline="") as f:
            table = list(csv.reader(f))
        classes = table[0][1:]
        counts = [[int(v) for v in row[1:]] for row in table[1:]]
        fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
        ax.imshow(counts, cmap="Blues")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
               title="confusion matrix")
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        top = max(max(r) for r in counts) or 1
        for i, row in enumerate(counts):
            for j, v in enumerate(row):
                ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black")
        fig.tight_layout()
        written.append(os.path.join(folder, "confusion_matrix.png"))
        save_png(fig, written[-1])
    predictions_path = os.path.join(folder, "predictions.csv")
    if os.path.exists(predictions_path) and top_losses:
        written.append(os.path.join(folder, "top_losses.png"))
        save_png(draw_top_losses(plt, predictions_path, top_losses), written[-1])
    if os.path.exists(predictions_path):
        probabilities, labels = read_predictions(predictions_path)
        if len(labels):
            written.append(os.path.join(folder, "reliability.png"))
            save_png(draw_reliability(plt, probabilities, labels), written[-1])
            written.append(os.path.join(folder, "risk_coverage.png"))
            save_png(draw_risk_coverage(plt, probabilities, labels), written[-1])
    suspects_path = os.path.join(folder, "suspect_labels.csv")
    if os.path.exists(suspects_path) and suspect_labels:
        written.append(os.path.join(folder, "suspect_labels.png"))
        save_png(draw_suspect_labels(plt, suspects_path, suspect_labels), written[-1])
    if not written:
        raise UserError(f"{folder} has no metrics.csv, confusion_matrix.csv or predictions.csv: "
                        "train (python train.py) or evaluate (python train.py --eval-only) first")
    return written


def draw_top_losses(plt, predictions_path, count):
    """The `count` images with the highest loss in predictions.csv, each as a photo viewer shows it,
    captioned with its true class, the predicted class and that prediction's probability."""
    with open(predictions_path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["loss"]), reverse=True)[:count]
    captions = []
    for row in rows:
        probability = float(row["p_" + row["predicted_class"]])
        captions.append(f"true {row['true_class']}\npredicted {row['predicted_class']} {probability:.2f}\n"
                        f"loss {float(row['loss']):.2f}")
    return photo_grid(plt, [row["file"] for row in rows], captions, predictions_path,
                      "run --eval-only again where the val images are",
                      f"the {len(rows)} validation images with the highest loss")


def draw_suspect_labels(plt, suspects_path, count):
    """The first `count` photos of suspect_labels.csv (the least likely labels first), each captioned
    with its given class, the class the model suggests and the score (1 - p(given class))."""
    with open(suspects_path, newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f), count))
    if not rows:
        raise UserError(f"{suspects_path} lists no photos: train again to write it")
    captions = [f"given {row['given_class']}\nsuggested {row['suggested_class']}\nscore {float(row['score']):.2f}"
                for row in rows]
    return photo_grid(plt, [row["file"] for row in rows], captions, suspects_path,
                      "check that the training photos are where the run found them",
                      f"the {len(rows)} training photos whose label the model finds least likely")


def photo_grid(plt, files, captions, listed_in, hint, title):
    """The photos (files) in rows of up to 4, each as a photo viewer shows it, under its caption."""
    from inference.images import load_image

    columns = min(4, len(files))
    lines = (len(files) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3 * columns, 3.3 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, file, caption in zip(axes.flat, files, captions):
        try:
            image = load_image(file, min_side=256)
        except OSError as e:
            raise UserError(f"cannot read {file} named in {listed_in} ({e.strerror or e}): {hint}") from e
        image.thumbnail((256, 256))
        ax.imshow(image)
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.3 * lines)))  # the top captions below the title, not over it
    return fig


def read_predictions(path):
    """(probabilities N x classes, true class indices N) of a predictions.csv."""
    import numpy as np

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        classes = [c[2:] for c in reader.fieldnames or [] if c.startswith("p_")]
        rows = list(reader)
    try:
        probabilities = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows]).reshape(len(rows), len(classes))
        labels = np.array([classes.index(r["true_class"]) for r in rows], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a predictions.csv of train.py --eval-only ({type(e).__name__}: {e}): "
                        "run --eval-only again") from None
    return probabilities, labels


def draw_reliability(plt, probabilities, labels):
    """The reliability diagram: per bin of the top probability, the accuracy of its images against
    their mean top probability (on the diagonal when calibrated), and how many images each bin holds."""
    from inference import calibration

    bins = calibration.ECE_BINS
    table = calibration.reliability_table(probabilities, labels, bins)
    ece = calibration.expected_calibration_error(probabilities, labels, bins)
    width = 1 / bins
    lefts = [b * width for b in range(bins)]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=(3, 1), sharex=True)
    ax.bar(lefts, [a if n else 0 for n, _, a in table], width=width, align="edge", edgecolor="black",
           color="tab:blue", label="accuracy of the bin")
    ax.bar(lefts, [c - a if n else 0 for n, c, a in table], bottom=[a if n else 0 for n, _, a in table],
           width=width, align="edge", color="tab:red", alpha=0.3, hatch="//", label="gap to its mean probability")
    shown = [(left + width / 2, c) for left, (n, c, _) in zip(lefts, table) if n]
    ax.plot(*zip(*shown), "_", color="black", markersize=14, markeredgewidth=2, label="mean top probability")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability: ECE {ece:.4f} ({bins} bins, {len(labels)} images)")
    ax.legend(loc="upper left")
    ax_count.bar(lefts, [n for n, _, _ in table], width=width, align="edge", color="gray", edgecolor="black")
    ax_count.set(xlabel="top probability (calibrated)", ylabel="images")
    for a in (ax, ax_count):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def draw_risk_coverage(plt, probabilities, labels):
    """Accuracy of the answered images against the share answered, the most confident first."""
    from inference import calibration

    coverage, accuracy = calibration.risk_coverage_curve(probabilities, labels)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(coverage, accuracy, "-", color="tab:blue")
    for c, threshold, _, a in calibration.risk_coverage(probabilities, labels):
        ax.plot([c], [a], "o", color="tab:orange")
        ax.annotate(f"{threshold:.2f}", (c, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xlabel="coverage (share of images answered, the most confident first)",
           ylabel="accuracy of the answered", xlim=(0, 1.02),
           title="accuracy against coverage (labels: the threshold)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def draw_network(args):
    """--feature-maps or --filters: one PNG of what the trained network in --weights sees."""
    import torch

    from inference import checkpoint, visualize

    if not args.weights:
        raise UserError("--feature-maps and --filters draw trained weights: pass --weights weights/best.pth")
    model, _, preprocessing = checkpoint.load_model(args.weights, "class_indices.json", torch.device("cpu"))
    if args.filters:
        picture, boxes = visualize.conv1_filters(model)
    else:
        if not os.path.isfile(args.feature_maps):
            raise UserError(f"photo {args.feature_maps} does not exist: check the path")
        try:
            picture, boxes = visualize.feature_maps(model, args.feature_maps, preprocessing, args.layer, args.channels)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {args.feature_maps} ({type(e).__name__}: {e})") from e
    output = args.output or ("conv1_filters.png" if args.filters else f"feature_maps_{args.layer}.png")
    visualize.save_picture(picture, output)
    return [output], len(boxes)


def main(args):
    if args.feature_maps or args.filters:
        written, tiles = draw_network(args)
        print(f"wrote {written[0]}: {tiles} tiles")
        return 0
    if not os.path.isdir(args.folder):
        raise UserError(f"folder {args.folder} does not exist: pass the --output-dir of a run of train.py")
    with RunLock(args.folder, purpose="report", instead=None):  # never beside a run writing there
        for path in plot(args.folder, args.top_losses, args.suspect_labels):
            print(f"wrote {path}")
    return 0


def run(argv=None):
    return options.run_command(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
