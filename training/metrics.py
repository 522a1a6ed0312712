"""The scores of an evaluation and where training writes them: metrics.csv, the confusion matrix,
per-image predictions and TensorBoard."""
import csv
import io
import os

import numpy as np

from inference import calibration
from plumbing.atomic import SaveError, atomic_write_text

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


def print_calibration(logits, labels, used, source, sureness=None):
    """How far the probabilities can be trusted: the NLL and ECE before and after the temperature
    (`used`, a calibration.Calibration; `source` says where it comes from), the share the "not sure"
    threshold answers (on `used`'s score, sureness: the images' scores; None: the top probability),
    and the accuracy of the most confident photos at a few coverages."""
    before, after = calibration.softmax(logits), calibration.softmax(logits, used.temperature)
    bins = f"{calibration.ECE_BINS} equal-width bins of the top probability"
    if used.temperature == 1.0:
        print(f"calibration: temperature 1 ({source}): NLL {calibration.nll(logits, labels):.4f}, ECE "
              f"{calibration.expected_calibration_error(before, labels):.4f} ({bins})"
              + ("; python train.py --eval-only --calibrate fits one on the val images" if "none" in source else ""))
    else:
        print(f"calibration: temperature {used.temperature:.4f} ({source}): NLL "
              f"{calibration.nll(logits, labels):.4f} -> {calibration.nll(logits, labels, used.temperature):.4f}, "
              f"ECE {calibration.expected_calibration_error(before, labels):.4f} -> "
              f"{calibration.expected_calibration_error(after, labels):.4f} ({bins}), before -> after it")
    top, right = after.max(axis=1), after.argmax(axis=1) == labels
    if not used.answers_all:
        answered = (top if sureness is None else sureness) >= used.min_confidence
        n = int(answered.sum())
        score = "" if used.score == calibration.SCORES[0] else f" of the {used.score} score"
        print(f"\"not sure\" below {used.min_confidence:.4f}{score}: {n}/{len(top)} images answered "
              f"({100 * n / max(len(top), 1):.1f}%), accuracy of those {right[answered].mean() if n else 0:.4f}")
    print("accuracy against coverage (only the most confident images answered):")
    print("coverage  threshold  accuracy  answered")
    for coverage, threshold, n, accuracy in calibration.risk_coverage(after, labels):
        print(f"{100 * coverage:7.0f}%  {threshold:9.4f}  {accuracy:8.4f}  {n:>8}/{len(top)}")


def print_unknowns(known, unknown, used, folder):
    """How well the "not sure" score (`used`'s, a calibration.Calibration) tells the test images from
    --unknowns' photos of none of the classes: the AUROC, and the shares caught and answered at the
    "not sure" threshold and at the one that answers 90% of the known images; then every score's
    AUROC. known, unknown: {score: the images' scores} (calibration.sureness), used.score's among them."""
    known_top, unknown_top = np.asarray(known[used.score]), np.asarray(unknown[used.score])
    print(f"unknowns: {len(unknown_top)} images of {folder}, photos of none of the classes: AUROC "
          f"{calibration.auroc(known_top, unknown_top):.4f} of the {calibration.SCORE_NAMES[used.score]} telling the "
          f"{len(known_top)} test images from them")
    none = calibration.no_threshold(used.score)
    ninety = calibration.choose_min_confidence(known_top, 0.9, used.score)
    rows = [("90% of the known answered", ninety)] if ninety != none else []
    if not used.answers_all:
        rows.insert(0, ("the \"not sure\" threshold", used.min_confidence))
    else:
        print("  no \"not sure\" threshold in these weights: every image is answered")
    if ninety == none:
        print(f"  {len(known_top)} test images are too few for a threshold that answers 90% of them")
    for name, threshold in rows:
        print(f"  at {name} ({threshold:.4f}): {100 * (unknown_top < threshold).mean():.1f}% of the unknowns "
              f"caught (answered unknown), {100 * (known_top >= threshold).mean():.1f}% of the known answered")
    print("  AUROC of each score: " + ", ".join(f"{s} {calibration.auroc(known[s], unknown[s]):.4f}" for s in known))


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


def report_epoch(run, epoch, lr, result, val, seconds):
    """The epoch's summary line, its metrics.csv row and its TensorBoard scalars."""
    metric = run.args.best_metric
    other = "" if metric == "accuracy" else f"val_{metric}: {val.scores[metric]:.3f}  "
    print(f"[epoch {epoch}] train_loss: {result.loss:.3f}  "
          + (f"train_accuracy: {result.accuracy:.3f}  " if result.accuracy is not None else "")
          + f"val_loss: {val.loss:.3f}  val_accuracy: {val.accuracy:.3f}  {other}{result.images_per_s:.1f} img/s  "
          f"{seconds:.0f} s")
    append_metrics(os.path.join(run.args.output_dir, "metrics.csv"), epoch,
                   dict(lr=lr, train_loss=result.loss,
                        train_accuracy="" if result.accuracy is None else result.accuracy,
                        val_loss=val.loss, val_accuracy=val.accuracy,
                        val_balanced_accuracy=val.scores["balanced_accuracy"], val_macro_f1=val.scores["macro_f1"],
                        images_per_s=result.images_per_s, seconds=seconds))
    if run.tensorboard:
        run.tensorboard.add({"epoch": epoch, "lr": lr, "train/loss": result.loss, "train/accuracy": result.accuracy,
                             "val/loss": val.loss, "val/accuracy": val.accuracy,
                             "images_per_s": result.images_per_s}, epoch * run.steps_per_epoch)
        run.tensorboard.flush()
