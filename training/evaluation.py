"""Evaluating a model on the val images: the loss, the scores and the confusion matrix every epoch,
and --eval-only's report with its per-image predictions."""
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from inference import checkpoint as ckpt
from model import logits_with_mirror
from plumbing import device as dev
from plumbing import distributed
from training import data
from training.metrics import print_evaluation, summary_scores, write_confusion_csv, write_predictions_csv


@dataclass
class Evaluation:
    loss: float
    scores: dict  # accuracy, balanced_accuracy, macro_f1 (metrics.summary_scores)
    confusion: torch.Tensor  # rows: true class, columns: predicted
    rows: Optional[list] = None  # per image: (dataset index, class probabilities, cross-entropy)

    @property
    def accuracy(self):
        return self.scores["accuracy"]


@torch.inference_mode()
def evaluate(model, loader, criterion, run, tta=False, per_image=False):
    """Loss, accuracy and confusion matrix over every val image, whichever process holds it; with
    per_image, also each image's probabilities and loss, in the dataset's order."""
    args, device = run.args, run.device
    num_classes = len(run.record.classes)
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum, rows = 0.0, []
    indices = iter(loader.sampler)  # an evaluation sampler hands out plain indices, in loading order
    for images, targets, valid in tqdm(loader, desc="val", disable=not run.is_main, file=sys.stdout,
                                       dynamic_ncols=True, leave=False):
        images = data.normalize_batch(images.to(device, non_blocking=True), run.record.preprocessing.mean,
                                      run.record.preprocessing.std, channels_last=args.channels_last)
        targets = targets.to(device, non_blocking=True)
        with dev.autocast(device, run.placement.amp_dtype):
            logits = logits_with_mirror(model, images) if tta else model(images)
        kept = [next(indices) for _ in range(len(valid))]
        if not valid.all():  # unreadable images are left out of every figure
            kept = [i for i, ok in zip(kept, valid.tolist()) if ok]
            valid = valid.to(device)
            logits, targets = logits[valid], targets[valid]
            if not len(targets):
                continue
        loss_sum += criterion(logits.float(), targets).item() * len(targets)
        confusion += torch.bincount(targets * num_classes + logits.argmax(dim=1),
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
        if per_image:
            log_p = torch.log_softmax(logits.float(), dim=1)
            losses = -log_p.gather(1, targets[:, None])[:, 0]
            rows += list(zip(kept, log_p.exp().tolist(), losses.tolist()))
    counts = distributed.all_reduce_sum(confusion.flatten().tolist() + [loss_sum], device)
    confusion = torch.tensor(counts[:-1], dtype=torch.int64).view(num_classes, num_classes)
    if per_image:
        rows = sorted(r for part in distributed.all_gather(rows, device) for r in part)
    return Evaluation(counts[-1] / max(int(confusion.sum()), 1), summary_scores(confusion), confusion,
                      rows if per_image else None)


def evaluate_only(run, model, criterion, val_loader, start):
    """--eval-only: the report, confusion_matrix.csv and predictions.csv of --weights on the val images."""
    args = run.args
    ckpt.check_classes(args.weights, start.get("classes"), run.record.classes, "the val folder")
    result = evaluate(model, val_loader, criterion, run, tta=args.tta, per_image=True)
    unreadable = val_loader.dataset.unreadable()
    if unreadable and args.bad_images == "error":
        raise data.unreadable_error(unreadable[0])
    if unreadable:
        print(f"left out {len(unreadable)} unreadable image(s): " + "; ".join(unreadable))
    if run.is_main:
        classes = run.record.classes
        print_evaluation(classes, result.confusion, result.loss)
        path = os.path.join(args.output_dir, "confusion_matrix.csv")
        write_confusion_csv(path, classes, result.confusion)
        samples = val_loader.dataset.samples
        write_predictions_csv(os.path.join(args.output_dir, "predictions.csv"), classes,
                              [(samples[i][0], samples[i][1], p, loss) for i, p, loss in result.rows])
        print(f"confusion matrix and per-image predictions written to {path} and "
              f"{os.path.join(args.output_dir, 'predictions.csv')}")
    return 0
