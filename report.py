"""What the model learned: per-epoch metrics, per-class scores and the confusion matrix."""
import csv
import os

from plumbing.atomic import SaveError, atomic_write


def save_png(fig, path):
    """fig as a PNG file, written atomically; a full disk ends the program with a one-line error."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    except SaveError as e:
        raise SystemExit(f"error: {e}")
    finally:
        plt.close(fig)


def plot(folder, top_losses=16):
    """Draw folder/metrics.csv as loss and accuracy curves, folder/confusion_matrix.csv, and the
    top_losses images of folder/predictions.csv with the highest loss."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib, an optional dependency: pip install matplotlib")
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
    if not written:
        raise SystemExit(f"error: {folder} has no metrics.csv, confusion_matrix.csv or predictions.csv: "
                         "train (python train.py) or evaluate (python train.py --eval-only) first")
    return written


def draw_top_losses(plt, predictions_path, count):
    """The `count` images with the highest loss in predictions.csv, each as a photo viewer shows it,
    captioned with its true class, the predicted class and that prediction's probability."""
    from inference.images import load_image

    with open(predictions_path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["loss"]), reverse=True)[:count]
    columns = min(4, len(rows))
    lines = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3 * columns, 3.3 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        try:
            image = load_image(row["file"], min_side=256)
        except OSError as e:
            raise SystemExit(f"error: cannot read {row['file']} named in {predictions_path} ({e.strerror or e}): "
                             "run --eval-only again where the val images are")
        image.thumbnail((256, 256))
        ax.imshow(image)
        probability = float(row[f"p_{row['predicted_class']}"])
        ax.set_title(f"true {row['true_class']}\npredicted {row['predicted_class']} {probability:.2f}\n"
                     f"loss {float(row['loss']):.2f}", fontsize=9)
    fig.suptitle(f"the {len(rows)} validation images with the highest loss")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    import argparse
    import sys

    from plumbing import options
    from plumbing.run_lock import RunLock

    parser = argparse.ArgumentParser(description="Draw a run's curves (metrics.csv), confusion matrix "
                                                 "(confusion_matrix.csv) and worst-classified images "
                                                 "(predictions.csv) to PNG files beside them.")
    parser.add_argument("folder", nargs="?", default="weights", help="the run's --output-dir")
    parser.add_argument("--top-losses", type=options.non_negative_int, default=16,
                        help="how many of the highest-loss val images top_losses.png shows (0: none)")
    args = parser.parse_args()

    def draw(args):
        with RunLock(args.folder, purpose="report", instead=None):  # never beside a run writing there
            for path in plot(args.folder, args.top_losses):
                print(f"wrote {path}")

    sys.exit(options.run_command(draw, args))
