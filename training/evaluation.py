"""Evaluating a model on the val images: the loss, the scores and the confusion matrix every epoch;
the temperature and threshold fitted when training ends; and --eval-only: the test images it scores,
its report with the calibration and the accuracy against coverage, and its per-image predictions."""
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from inference import calibration
from inference import checkpoint as ckpt
from model import logits_with_mirror
from plumbing import device as dev
from plumbing import distributed
from plumbing.options import UserError
from plumbing.run_lock import RunLock
from training import data
from training.metrics import (
    print_calibration,
    print_evaluation,
    print_unknowns,
    summary_scores,
    write_confusion_csv,
    write_predictions_csv,
)


@dataclass
class Evaluation:
    loss: float
    scores: dict  # accuracy, balanced_accuracy, macro_f1 (metrics.summary_scores)
    confusion: torch.Tensor  # rows: true class, columns: predicted
    # per image: (dataset index, logits in float32, rotation agreement or None), in the dataset's order
    rows: Optional[list] = None

    @property
    def accuracy(self):
        return self.scores["accuracy"]


@torch.inference_mode()
def evaluate(model, loader, criterion, run, tta=False, per_image=False, fp32=False, rotation=False):
    """Loss, accuracy and confusion matrix over every val image, whichever process holds it; with
    per_image, also each image's logits (and with rotation, its model.rotation_agreement), in the
    dataset's order. fp32: without the run's autocast, and without TF32 (for the logits a temperature
    is fitted on)."""
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
        with dev.exact_fp32() if fp32 else dev.autocast(device, run.placement.amp_dtype):
            logits = logits_with_mirror(model, images) if tta else model(images)
            agreement = [None] * len(images)
            if rotation and per_image:  # as predict.py computes it, with --tta the mean of image and mirror
                turned = model.rotation_agreement(images)
                if tta:
                    turned = (turned + model.rotation_agreement(images.flip(3))) / 2
                agreement = turned.float().cpu().tolist()
        kept = [next(indices) for _ in range(len(valid))]
        if not valid.all():  # unreadable images are left out of every figure
            kept = [i for i, ok in zip(kept, valid.tolist()) if ok]
            agreement = [a for a, ok in zip(agreement, valid.tolist()) if ok]
            valid = valid.to(device)
            logits, targets = logits[valid], targets[valid]
            if not len(targets):
                continue
        loss_sum += criterion(logits.float(), targets).item() * len(targets)
        confusion += torch.bincount(targets * num_classes + logits.argmax(dim=1),
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
        if per_image:
            rows += list(zip(kept, logits.float().cpu().tolist(), agreement))
    counts = distributed.all_reduce_sum(confusion.flatten().tolist() + [loss_sum], device)
    confusion = torch.tensor(counts[:-1], dtype=torch.int64).view(num_classes, num_classes)
    if per_image:
        rows = sorted(r for part in distributed.all_gather(rows, device) for r in part)
    return Evaluation(counts[-1] / max(int(confusion.sum()), 1), summary_scores(confusion), confusion,
                      rows if per_image else None)


def labelled_logits(result, dataset, num_classes):
    """(dataset indices, logits N x classes in float64, true classes N) of an evaluation's per-image rows."""
    indices = [i for i, _, _ in result.rows]
    logits = np.array([values for _, values, _ in result.rows], dtype=np.float64).reshape(len(indices), num_classes)
    labels = np.array([dataset.samples[i][1] for i in indices], dtype=np.int64)
    return indices, logits, labels


def rotation_agreements(result):
    """The per-image rotation agreements (N, float64) of an evaluation run with rotation=True, else None."""
    values = [a for _, _, a in result.rows]
    return None if not values or values[0] is None else np.array(values, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# When training ends: the temperature and the "not sure" threshold
# ---------------------------------------------------------------------------------------------
def calibrate_best(run, model, val_loader, criterion, log):
    """Fit the temperature and the threshold of best.pth's weights (the EMA's, as validated) on the
    un-augmented val images, without TTA, in fp32, and add them to best.pth. Every process loads
    best.pth and evaluates its share of the images; rank 0 rewrites the file (atomically)."""
    if not os.path.isfile(run.best_path):
        return
    best = ckpt.load_checkpoint(run.best_path)
    model.load_state_dict(ckpt.clean_state_dict(best["model"]))
    score = run.args.not_sure_score
    result = evaluate(model, val_loader, criterion, run, per_image=True, fp32=True, rotation=score == "rotation")
    _, logits, labels = labelled_logits(result, val_loader.dataset, len(run.record.classes))
    fitted = calibration.fit_calibration(logits, labels, score=score, rotation=rotation_agreements(result))
    if fitted is None:
        log(f"calibration: {len(labels)} readable val images, fewer than {calibration.MIN_FIT_IMAGES}: no "
            "temperature or \"not sure\" threshold fitted (probabilities stay the softmax of the logits)")
        return
    best.update(temperature=fitted.calibration.temperature, min_confidence=fitted.calibration.min_confidence,
                not_sure_score=score, calibration=fitted.record())
    distributed.run_on_main(run.device, ckpt.save_checkpoint, best, run.best_path,
                            "best.pth keeps its weights without the temperature; free some disk space and run "
                            f"python train.py --eval-only --calibrate --weights {run.best_path} --data-path "
                            f"{run.args.data_path}")
    log(f"calibration on the {fitted.images} val images (best.pth's weights, fp32, no TTA): " + fit_summary(fitted)
        + f"; saved in {run.best_path}")


def fit_summary(fitted):
    c = fitted.calibration
    return (f"temperature {c.temperature:.3f}; NLL {fitted.nll_before:.4f} -> {fitted.nll_after:.4f}, ECE "
            f"({calibration.ECE_BINS} bins) {fitted.ece_before:.4f} -> {fitted.ece_after:.4f}; \"not sure\" below "
            f"{c.min_confidence:.4f}" + ("" if c.score == calibration.SCORES[0] else f" of the {c.score} score")
            + f" (answers {100 * fitted.answered:.1f}% of them)"
            + (f"; {fitted.note}" if fitted.note else ""))


# ---------------------------------------------------------------------------------------------
# --eval-only
# ---------------------------------------------------------------------------------------------
def find_test_data(root, known_classes, recorded_split, log=print, missing_hint=None):
    """The images --eval-only scores: every image of root/<class>/ (or of root/val/<class>/), never a
    split of them, with the classes matched by name to known_classes (the weights'; None for a plain
    state dict: the folder's own). A folder that lacks some of the classes is scored on those it has;
    a class folder the weights do not know is an error that names it.

    The exception: a plain folder that holds every val file the weights recorded (recorded_split,
    paths relative to the folder) is the folder they were trained on, and only those files are
    scored, since the weights have seen the others."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist: "
                        + (missing_hint or f"pass --data-path with {data.LAYOUTS}"))
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    split_tree = os.path.isdir(train_dir) or os.path.isdir(val_dir)
    if split_tree and not os.path.isdir(val_dir):
        raise UserError(f"data folder {val_dir} does not exist: --eval-only scores the val/ half of a split")
    folder = val_dir if split_tree else root
    if not split_tree and not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
        files = sum(1 for e in os.scandir(root) if e.is_file())
        raise UserError(f"{root} holds {files} file(s) and no folders: pass --data-path with {data.LAYOUTS}")
    present = data.find_classes(folder)
    classes = list(known_classes) if known_classes else present
    unknown = [c for c in present if c not in classes]
    if unknown:
        raise UserError(f"{folder} has the class folder{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}, "
                        f"which the weights do not know (their classes: {', '.join(classes)}): remove or rename "
                        "it, or evaluate weights trained on it")
    recorded = (recorded_split or {}).get("val_files") or []
    held = [f for f in recorded if os.path.isfile(os.path.join(folder, *f.split("/")))]
    if not split_tree and recorded and len(held) == len(recorded) and all(f.split("/")[0] in classes for f in held):
        val = sorted(((os.path.join(folder, *f.split("/")), classes.index(f.split("/")[0])) for f in held),
                     key=lambda s: (s[1], s[0]))
        log(f"test set: {root} is the folder these weights were trained on: scoring only its {len(val)} val "
            f"images (ratio {recorded_split['val_ratio']}, seed {recorded_split['seed']}), the others were trained on")
        return data.FoundData(classes, [], val, recorded_split)
    val = [(path, classes.index(present[k])) for path, k in data.list_images(folder, present)]
    absent = [c for c in classes if c not in present]
    log(f"test set: every image of {folder}: " + ", ".join(f"{c} {sum(k == i for _, k in val)}"
                                                          for i, c in enumerate(classes) if c in present)
        + (f"; no folder for {', '.join(absent)}, so scored on the {len(present)} "
           f"{'classes' if len(present) > 1 else 'class'} it has" if absent else ""))
    if held:
        log(f"note: {folder} holds {len(held)} of the {len(recorded)} val images these weights were validated on "
            f"(same names, {held[0]} first) but not all: if it is the folder they were trained on, they have seen "
            "its other images and the scores below are too high")
    return data.FoundData(classes, [], val, None)


def check_calibrate(args, start, preprocessing):
    """--calibrate's and --unknowns' preconditions, before minutes of decoding. preprocessing: the
    evaluation's, which must be what predict.py will feed the weights (the one they record)."""
    if args.unknowns and not args.eval_only:
        raise UserError("--unknowns goes with --eval-only: train, then score the weights with it")
    if not args.calibrate:
        return
    if not args.eval_only:
        raise UserError("--calibrate goes with --eval-only (training fits the temperature when it ends)")
    if args.tta:
        raise UserError("--calibrate fits the temperature on the logits predict.py computes, without "
                        "--tta: leave out --tta")
    if args.weights == "imagenet" or not (start or {}).get("classes"):
        raise UserError(f"--calibrate stores the temperature in --weights, and {args.weights} is no checkpoint "
                        "of train.py's: pass a best.pth")
    recorded = ckpt.preprocessing_of(start)
    if (preprocessing.resize, preprocessing.crop) != (recorded.resize, recorded.crop):
        given = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("val_crop", "val_resize")
                         if getattr(args, k))
        raise UserError(f"--calibrate fits the temperature on the pixels predict.py feeds {args.weights}, "
                        f"{recorded.crop} px crops of images resized to {recorded.resize} as it records: "
                        + (f"leave out {given}" if given
                               else f"pass --val-crop {recorded.crop} --val-resize {recorded.resize}"))


def lock_weights_folder(args, cleanup, log):
    """--calibrate rewrites --weights: take the lock of the folder that holds them (cleanup releases
    it) before they are read and before anything is written, so that a run still training there
    refuses this one instead of having its newer best.pth replaced by the older one, a refusal
    leaves nothing behind (no --output-dir made), and no run starts there until the new file is in.
    The lock, or None (prepare_output_dir takes it as --output-dir's when that is the same folder)."""
    if not args.calibrate or not os.path.isfile(args.weights):
        return None  # no file to rewrite: read_checkpoints says what is wrong
    lock = RunLock(os.path.dirname(args.weights) or ".", purpose="calibration", log=log,
                   instead=f"calibrate a copy of {args.weights} kept in another folder")
    cleanup.callback(lock.release)
    return lock.acquire()


def evaluate_only(run, model, criterion, val_loader, start, log):
    """--eval-only: the report, confusion_matrix.csv and predictions.csv of --weights on the test images,
    its probabilities calibrated with the weights' temperature (or one fitted here with --calibrate).

    Under torchrun every process decides alike: from what all of them found unreadable, with the
    report written by rank 0 and the --unknowns folder checked in every process, so that a failure
    in one process ends every process at once (distributed.fail_together), never a hang."""
    args = run.args
    classes = run.record.classes
    recorded = calibration.of_checkpoint(start)
    score = args.not_sure_score or recorded.score  # --not-sure-score: another score for these weights
    has_head = getattr(model, "rotation", None) is not None
    if score == "rotation" and not has_head:
        raise UserError(f"{args.weights} has no rotation head, which the rotation score needs: pass another "
                        "--not-sure-score, or weights trained with --rotation-weight")
    # --calibrate: the logits the temperature is fitted on in fp32, as training fits it (run() turned --amp off)
    result = evaluate(model, val_loader, criterion, run, tta=args.tta, per_image=True, fp32=args.calibrate,
                      rotation=has_head)
    unreadable = sorted({p for part in distributed.all_gather(val_loader.dataset.unreadable(), run.device)
                         for p in part})
    if unreadable and args.bad_images == "error":
        raise data.unreadable_error(unreadable[0])
    if unreadable:
        log(f"left out {len(unreadable)} unreadable image(s): " + "; ".join(unreadable))
    indices, logits, labels = labelled_logits(result, val_loader.dataset, len(classes))
    rotation = rotation_agreements(result)
    used, source = recorded, f"recorded in {args.weights}"
    if "temperature" not in start:
        source = f"none in {args.weights}"
    if score != recorded.score and not args.calibrate:  # its threshold is the 95% one of these images
        threshold = calibration.choose_min_confidence(calibration.sureness(score, logits, used.temperature, rotation),
                                                      calibration.ANSWERED, score)
        used = calibration.Calibration(used.temperature, threshold, score)
        source += f"; the {score} score's threshold chosen here to answer 95% of these images"
    if args.calibrate:
        fitted = calibration.fit_calibration(logits, labels, score=score, rotation=rotation)
        if fitted is None:
            raise UserError(f"--calibrate needs at least {calibration.MIN_FIT_IMAGES} readable images to fit on, "
                            f"and {args.data_path} has {len(labels)} here: pass a folder with more")
        used, source = fitted.calibration, f"fitted here on these {fitted.images} images"
        start = dict(start, temperature=used.temperature, min_confidence=used.min_confidence,
                     not_sure_score=score, calibration=fitted.record())
        distributed.run_on_main(run.device, ckpt.save_checkpoint, start, args.weights,
                                f"{args.weights} is unchanged; free some disk space and run it again")
        log(f"calibration: {fit_summary(fitted)}; saved in {args.weights}")
    sureness = calibration.sureness(score, logits, used.temperature, rotation)
    distributed.run_on_main(run.device, report_test_set, args, classes, result, val_loader.dataset.samples,
                            (indices, logits, labels, sureness), used, source)
    if args.unknowns:
        # checked in every process, which then all make the loader (whose image cache is shared through collectives)
        paths = distributed.run_everywhere(run.device, data.find_unknowns, args.unknowns, args.bad_images, log)
        loader = data.unknowns_loader(paths, run.record.preprocessing, args, run.device, run.rank, run.world_size,
                                      val_loader.num_workers)
        unknown = evaluate(model, loader, criterion, run, tta=args.tta, per_image=True,  # its loss means nothing
                           fp32=args.calibrate, rotation=has_head)
        _, unknown_logits, _ = labelled_logits(unknown, loader.dataset, len(classes))
        if run.is_main:
            scores = [s for s in calibration.SCORES if s != "rotation" or has_head]
            known, unknowns = ({s: calibration.sureness(s, z, used.temperature, r) for s in scores}
                               for z, r in ((logits, rotation), (unknown_logits, rotation_agreements(unknown))))
            print_unknowns(known, unknowns, used, args.unknowns)
    return 0


def report_test_set(args, classes, result, samples, scored, used, source):
    """--eval-only's report on the test images, confusion_matrix.csv and predictions.csv (rank 0's part).
    scored: (dataset indices, logits, true classes, "not sure" scores) of the images scored."""
    indices, logits, labels, sureness = scored
    print_evaluation(classes, result.confusion, result.loss)
    absent = [c for c, n in zip(classes, result.confusion.sum(dim=1).tolist()) if not n]
    if absent:
        print(f"no images of {', '.join(absent)} were scored: their rows above are empty")
    print_calibration(logits, labels, used, source, sureness)
    path = os.path.join(args.output_dir, "confusion_matrix.csv")
    write_confusion_csv(path, classes, result.confusion)
    z = logits / used.temperature
    log_p = z - z.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    write_predictions_csv(os.path.join(args.output_dir, "predictions.csv"), classes,
                          [(samples[i][0], samples[i][1], np.exp(row).tolist(), -row[samples[i][1]])
                           for i, row in zip(indices, log_p)])
    print(f"confusion matrix and per-image predictions written to {path} and "
          f"{os.path.join(args.output_dir, 'predictions.csv')}")
