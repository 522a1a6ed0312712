"""What the model learned: per-epoch metrics, per-class scores and the confusion matrix."""
import csv
import io
import os

from checkpoint import atomic_write_text

METRIC_FIELDS = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "images_per_s", "seconds"]


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


def print_evaluation(classes, confusion, loss=None):
    total = int(confusion.sum())
    accuracy = int(confusion.diag().sum()) / total if total else 0.0
    width = max(len(c) for c in classes + ["class"])
    print(f"accuracy: {accuracy:.4f} ({int(confusion.diag().sum())}/{total})"
          + (f"  loss: {loss:.4f}" if loss is not None else ""))
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
