"""What the model learned: per-epoch metrics, per-class scores and the confusion matrix."""
import csv
import io
import os

from atomic import SaveError, atomic_write, atomic_write_text

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
                 "val_macro_f1", "images_per_s", "seconds"]
BEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # what --best-metric can choose


def append_metrics(path, epoch, row):
    """Add one epoch's row to metrics.csv; rows of this epoch or later (a resumed run) are replaced."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) < epoch]
    rows.append({"epoch": epoch, **{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def per_class_scores(confusion):
    """[(precision, recall, accuracy, support)] per class; confusion rows are the true classes.

    Per-class accuracy is (TP + TN) / all images: how often the one-vs-rest decision is right.
    """
    total = int(confusion.sum())
    scores = []
    for k in range(confusion.shape[0]):
        tp = int(confusion[k, k])
        predicted = int(confusion[:, k].sum())
        support = int(confusion[k, :].sum())
        tn = total - predicted - support + tp
        scores.append((tp / predicted if predicted else 0.0, tp / support if support else 0.0,
                       (tp + tn) / total if total else 0.0, support))
    return scores


def summary_scores(confusion):
    """{"accuracy", "balanced_accuracy", "macro_f1"} of a confusion matrix. Balanced accuracy is the
    mean recall over the classes that have images; macro-F1 the mean F1 over the classes that have
    images or predictions (as scikit-learn's defaults compute them): with uneven classes, a model
    that ignores a small class scores low on both even when its accuracy is high."""
    total = int(confusion.sum())
    per_class = per_class_scores(confusion)
    recalls = [r for _, r, _, n in per_class if n]
    f1s = [2 * p * r / (p + r) if p + r else 0.0 for k, (p, r, _, n) in enumerate(per_class)
           if n or int(confusion[:, k].sum())]
    return {"accuracy": int(confusion.diag().sum()) / total if total else 0.0,
            "balanced_accuracy": sum(recalls) / len(recalls) if recalls else 0.0,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def print_evaluation(classes, confusion, loss=None):
    total = int(confusion.sum())
    scores = summary_scores(confusion)
    width = max(len(c) for c in classes + ["class"])
    print(f"accuracy: {scores['accuracy']:.4f} ({int(confusion.diag().sum())}/{total})"
          + (f"  loss: {loss:.4f}" if loss is not None else "")
          + f"  balanced accuracy: {scores['balanced_accuracy']:.4f}  macro-F1: {scores['macro_f1']:.4f}")
    print(f"{'class':<{width}}  precision  recall  accuracy  images")
    for name, (p, r, a, n) in zip(classes, per_class_scores(confusion)):
        print(f"{name:<{width}}  {p:9.4f}  {r:6.4f}  {a:8.4f}  {n:6d}")
    print("confusion matrix (rows: true class, columns: predicted):")
    cell = max(6, max(len(c) for c in classes))
    print(" " * width + "  " + " ".join(f"{c[:cell]:>{cell}}" for c in classes))
    for name, row in zip(classes, confusion.tolist()):
        print(f"{name:<{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))


def write_confusion_csv(path, classes, confusion):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true \\ predicted"] + classes)
    for name, row in zip(classes, confusion.tolist()):
        writer.writerow([name] + row)
    atomic_write_text(path, out.getvalue())


PREDICTION_FIELDS = ["file", "true_class", "predicted_class", "loss"]  # then one probability per class


def write_predictions_csv(path, classes, rows):
    """predictions.csv: per image (path, true class index, probabilities, cross-entropy), in that order."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PREDICTION_FIELDS + [f"p_{c}" for c in classes])
    for path_, target, probabilities, loss in rows:
        best = max(range(len(classes)), key=probabilities.__getitem__)
        writer.writerow([path_, classes[target], classes[best], f"{loss:.6f}"] + [f"{p:.6f}" for p in probabilities])
    atomic_write_text(path, out.getvalue())


class TensorBoardLog:
    """--tensorboard: the run's scalars in folder for `tensorboard --logdir`, rank 0 only.

    Every scalar is logged at the global step (training steps since the start of the run), the
    per-epoch ones at their epoch's last step. A resumed run opens its writer with purge_step set to
    its next step, so TensorBoard drops whatever an interrupted run had logged past it: the curves
    continue with no step twice. Raises ImportError without the tensorboard package.
    """

    def __init__(self, folder, next_step):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(folder, purge_step=next_step if next_step > 1 else None)

    def add(self, scalars, step):
        try:
            for tag, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)
        except OSError as e:
            raise SaveError(self.folder, e) from e

    def flush(self):
        try:
            self.writer.flush()
        except OSError as e:
            raise SaveError(self.folder, e) from e

    def close(self):
        self.writer.close()


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
    from images import load_image

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

    import options

    parser = argparse.ArgumentParser(description="Draw a run's curves (metrics.csv), confusion matrix "
                                                 "(confusion_matrix.csv) and worst-classified images "
                                                 "(predictions.csv) to PNG files beside them.")
    parser.add_argument("folder", nargs="?", default="weights", help="the run's --output-dir")
    parser.add_argument("--top-losses", type=options.non_negative_int, default=16,
                        help="how many of the highest-loss val images top_losses.png shows (0: none)")
    args = parser.parse_args()
    for path in plot(args.folder, args.top_losses):
        print(f"wrote {path}")
