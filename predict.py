"""Classify photos with trained weights.

    python predict.py tulip.jpg                          # every class with its probability
    python predict.py photos/ more.jpg --output out.csv  # a table, also written as CSV or JSON
    python predict.py photos/ --output out.csv --sort-into sorted/  # a big folder: resumable, sorted by class
    python predict.py tulip.jpg --weights googlenet.onnx # through ONNX Runtime, without torch

A photo's way, each step entered once from main() and classify() here:

    load    classify.load_classifier: the weights, opened as classify.WEIGHTS_FORMATS says (a .pth file
            in PyTorch; a .onnx file from export.py, fp32 or INT8, in ONNX Runtime or OpenVINO, never
            importing torch, which takes seconds to import)
    score   classify.score_batches: read and preprocess each photo (inference/images.py, as validation
            does), run the model, calibrate: the softmax of the logits divided by the weights'
            temperature, and the "not sure" score the weights record (the top probability unless
            trained with --not-sure-score)
    decide  classify.decide: the most likely class, or "unknown" when that score is below the
            weights' threshold (or the top probability below --min-confidence), with its best guesses
    write   Outputs.write: the table, the .csv rows as they come and --sort-into, batch by batch;
            Outputs.finish: the one photo's classes, a .json and --cam's heat maps at the end
"""
import argparse
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm

from inference import images, visualize
from inference.calibration import SCORE_NAMES, UNKNOWN
from inference.classify import (
    CsvOutput,
    PhotoSorter,
    ScoredBatch,
    collect_images,
    decide,
    load_classifier,
    score_batches,
    weights_format,
    write_output,
)
from plumbing import options
from plumbing.options import UserError
from plumbing.stopping import StopRequest

# More photos than this with --output or --sort-into: a progress bar on stderr instead of the table
TABLE_ROWS = 50


def main(args):
    if args.output and not args.output.lower().endswith((".csv", ".json")):
        raise UserError(f"--output {args.output}: the file name must end in .csv or .json")
    files = photos_to_classify(args.images, args.sort_into)
    check_format_options(args)
    classifier = load_classifier(args.weights, args.class_indices, args.device, args.amp,  # load
                                 warn=lambda line: print(line, file=sys.stderr), runtime=args.runtime)
    classifier.calibration = classifier.calibration.with_min_confidence(args.min_confidence)
    outputs = Outputs.start(args, classifier.classes, files)
    try:
        interrupted = classify(args, classifier, outputs)
        return outputs.finish(interrupted, classifier)
    finally:
        outputs.close()


def classify(args, classifier, outputs):
    """Score, decide and write the photos a batch at a time; the signal that stopped it, or None."""
    workers = (args.workers if args.workers is not None
               else images.default_workers(classifier.device_type, args.batch_size, items=len(outputs.todo)))
    stop = StopRequest()
    try:
        with stop, outputs.bar:
            outputs.sort_earlier_rows(stop)
            batches = score_batches(classifier, outputs.todo, args.batch_size, workers, args.tta)  # score
            for batch in batches if stop.signal is None else ():
                outputs.write(batch, decide(batch, classifier))  # decide, write
                if stop.signal is not None:
                    break
        return stop.signal
    except KeyboardInterrupt:  # a second Ctrl-C, in the middle of a batch
        return signal.SIGINT


@dataclass
class Outputs:
    """Where the answers go and what has gone there: the table on stdout (up to TABLE_ROWS photos, or
    always without --output and --sort-into; streamed a batch at a time when longer), a .csv's rows as
    they come (rows; done: the photos it held already, todo: the rest), the sorted photos (sorter),
    and what the end needs (kept: the decided batches for the table, a .json and --cam)."""

    args: argparse.Namespace
    classes: list
    files: list
    todo: list
    done: dict
    rows: Optional[CsvOutput]
    sorter: Optional[PhotoSorter]
    table: bool
    streamed_table: bool
    bar: tqdm
    kept: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    classified: int = 0
    table_started: bool = False

    @classmethod
    def start(cls, args, classes, files):
        rows = CsvOutput(args.output, classes, files) if args.output and args.output.lower().endswith(".csv") else None
        done = rows.classes_of(files) if rows else {}
        todo = [f for f in files if f not in done]
        if rows and (done or rows.torn):
            torn = "; its last row had been cut short and that photo is classified again" if rows.torn else ""
            print(f"{len(done):,} of {len(files):,} photos are in {args.output} already (delete it to start over), "
                  f"{len(todo):,} to go{torn}")
        sorter = PhotoSorter(args.sort_into) if args.sort_into else None
        table = len(files) <= TABLE_ROWS or not (args.output or sorter)  # without either, the table is the result
        bar = tqdm(total=len(files), initial=len(done), unit="photo", desc="classify", file=sys.stderr,
                   dynamic_ncols=True, disable=table)
        return cls(args, classes, files, todo, done, rows, sorter, table, table and len(files) > TABLE_ROWS, bar)

    @property
    def to_json(self):
        return bool(self.args.output) and self.rows is None

    def sort_earlier_rows(self, stop):
        """--sort-into: the photos classified by an earlier run (without --sort-into, maybe) are sorted too."""
        for f, class_name in (self.done.items() if self.sorter else ()):
            if stop.signal is not None:
                break
            self.errors.append(sort_error(self.sorter, f, class_name))

    def write(self, scored, decided):
        """A batch's answers: its unreadable photos' errors, its photos sorted, its .csv rows, its part
        of a long table; kept for the end where that needs them."""
        self.errors.extend(f"cannot read image {f} ({e}): is it a complete image file?"
                           for f, e in zip(scored.files, scored.errors, strict=True) if e)
        if self.sorter:
            self.errors.extend(sort_error(self.sorter, f, answer)
                               for f, answer in zip(decided.files, decided.answers, strict=True))
        if self.rows:
            self.rows.append(decided.files, decided.answers, decided.probabilities)  # a full disk: SaveError
        if self.streamed_table and decided.files:
            print_table(decided, width=max(map(len, self.todo)), header=not self.table_started)
            self.table_started = True
        if (self.table and not self.streamed_table) or self.to_json or self.args.cam:
            self.kept.append(decided)
        self.classified += len(scored.files)
        self.bar.update(len(scored.files))

    def finish(self, interrupted, classifier):
        """What the end prints and writes (or, stopped, what the run kept); the exit code."""
        args, errors = self.args, [e for e in self.errors if e]
        if interrupted is not None:
            for e in errors:
                print(f"error: {e}", file=sys.stderr)
            kept = stopped_at(args, self.rows, self.sorter, len(self.done), self.classified, len(self.files))
            print(f"interrupted: {kept}", file=sys.stderr)
            return 128 + interrupted
        kept = joined(self.kept, len(self.classes))
        if len(self.files) == 1 and kept.files:
            print_one(kept, self.classes, classifier.calibration, args.topk)
        elif self.table and kept.files:
            print_table(kept, width=max(map(len, kept.files)))
        if self.rows:
            if self.rows.written or self.done:
                print(f"predictions written to {args.output}")
        elif self.to_json and kept.files:
            write_output(args.output, self.classes, kept)
            print(f"predictions written to {args.output}")
        if self.sorter:
            where = os.path.join(args.sort_into, "<class>", "")  # one slash, however --sort-into ends
            print(f"{self.sorter.linked + self.sorter.copied + self.sorter.already:,} photos sorted into {where} "
                  f"({self.sorter.linked:,} linked, {self.sorter.copied:,} copied, {self.sorter.already:,} there "
                  "already)")
        if args.cam and kept.files:
            written = visualize.write_cams(classifier.torch_model, kept.files, classifier.preprocessing,
                                           self.classes, kept.probabilities, args.cam, args.cam_class, args.cam_layer)
            print(f"{len(written)} Grad-CAM heat map(s) ({args.cam_layer}) written to {args.cam}")
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1 if errors else 0

    def close(self):
        if self.rows:
            self.rows.close()


def joined(batches, classes):
    """One decided ScoredBatch of several."""
    return ScoredBatch([f for b in batches for f in b.files],
                       np.concatenate([b.probabilities for b in batches]) if batches else np.zeros((0, classes)),
                       np.concatenate([b.sureness for b in batches]) if batches else np.zeros(0),
                       [e for b in batches for e in b.errors], [a for b in batches for a in b.answers])


def print_one(decided, classes, calibration, topk):
    """One photo's answer: every class (or the --topk most likely) with its probability, after a
    line saying why when the answer is "unknown"."""
    probabilities, score = decided.probabilities[0], calibration.score
    if decided.answers[0] == UNKNOWN:
        print(f"{UNKNOWN} (not sure): best guesses, the {SCORE_NAMES[score]}"
              + ("" if score == "max_probability" else f" {decided.sureness[0]:.4f}")
              + f" below {calibration.min_confidence:.4f}:")
    width = max(len(c) for c in classes)
    for k in np.argsort(-probabilities, kind="stable")[: topk or len(classes)].tolist():
        print(f"{classes[k]:<{width}}  {probabilities[k]:.4f}")


def print_table(decided, width, header=True):
    if header:
        print(f"{'file':<{width}}  {'class':<12} probability")
    for f, answer, p in zip(decided.files, decided.answers, decided.probabilities, strict=True):
        print(f"{f:<{width}}  {answer:<12} {p.max():.4f}")


def sort_error(sorter, photo, class_name):
    problem = sorter.place(photo, class_name)
    return f"cannot sort {photo} into {os.path.join(sorter.root, class_name)}: {problem}" if problem else ""


def stopped_at(args, rows, sorter, done, classified, total):
    """What a stopped run kept, and how to go on."""
    if rows:
        return (f"{done + rows.written:,} of {total:,} photos written to {args.output}; "
                "run the same command again to continue")
    if sorter:
        return (f"{classified:,} of {total:,} photos classified and sorted into {args.sort_into}; run the same "
                "command again to continue (photos sorted already are not added twice)")
    if args.output:
        return (f"{classified:,} of {total:,} photos classified and none written: {args.output} is written at the "
                "end (a .csv --output keeps its rows as they come, and a run with it continues)")
    return f"{classified:,} of {total:,} photos classified"


def check_format_options(args):
    """The options the weights' format (classify.WEIGHTS_FORMATS) cannot take, before the weights are read."""
    if weights_format(args.weights).torch:
        if args.runtime != "onnxruntime":
            raise UserError(f"--runtime {args.runtime} runs .onnx files and {args.weights} is PyTorch weights: "
                                  "export it with export.py, or leave --runtime out")
        return
    if args.cam:
        raise UserError("--cam needs the gradients of PyTorch weights: pass the .pth file the "
                              ".onnx file was exported from")
    if args.amp in ("bf16", "fp16"):
        raise UserError(f"--amp {args.amp} applies to PyTorch weights: a .onnx file runs as it was "
                              "exported; leave it out or pass the .pth file")
    if args.runtime == "openvino" and args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: --runtime openvino runs a .onnx file on the CPU; "
                              "leave --device out, or use --runtime onnxruntime (with onnxruntime-gpu)")


def photos_to_classify(paths, sort_into):
    """The image files of the paths given (folders searched), less those inside --sort-into."""
    if sort_into:
        check_sort_folder_outside(sort_into, paths)
    files = collect_images(paths)
    return outside_sorted_folder(files, sort_into) if sort_into else files


def check_sort_folder_outside(sort_into, paths):
    """A --sort-into folder inside the folder of photos given (a folder given, or the folder that
    holds a photo given by name) would be read as more photos by every later run over that folder
    (each photo twice, once as its link): refused."""
    sorted_folder = os.path.realpath(sort_into)
    for path in paths:
        folder = path if os.path.isdir(path) else os.path.dirname(path) or os.getcwd()
        if images.inside(sorted_folder, os.path.realpath(folder)):
            raise UserError(f"--sort-into {sort_into} lies inside {folder}, the photos' own folder: a later run "
                                  f"over {folder} would count each sorted photo twice; pass a --sort-into folder "
                                  f"outside {folder}")


def outside_sorted_folder(files, sort_into):
    """The photos that do not lie in --sort-into already (a folder sorted into itself would grow by
    its own links at every run)."""
    sorted_folder = os.path.realpath(sort_into)
    kept = [f for f in files if not images.inside(os.path.realpath(f), sorted_folder)]
    if len(kept) < len(files):
        print(f"{len(files) - len(kept):,} photo(s) inside --sort-into {sort_into} left out: they are sorted already")
    if not kept:
        raise UserError(f"every photo given lies inside --sort-into {sort_into}: pass the photos' own folder "
                              "and another --sort-into folder")
    return kept


def get_args_parser():
    p = argparse.ArgumentParser(description="Classify images with a trained GoogLeNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--weights", default=os.path.join("weights", "best.pth"),
                   help="a checkpoint from train.py, a plain state dict (then --class-indices names the classes), "
                        "or a .onnx file from export.py (run by ONNX Runtime, or --runtime)")
    p.add_argument("--class-indices", default="class_indices.json",
                   help="class names, used only when the weights file does not hold them")
    p.add_argument("--topk", type=options.positive_int, default=None,
                   help="show only the K most likely classes for one image")
    p.add_argument("--output", default=None,
                   help="also write the predictions to this .csv or .json file. A .csv gets its rows as the photos "
                        "are classified, and a run with the same .csv skips the photos it holds (however their "
                        "paths are typed) and adds the rest; a .json is written at the end")
    p.add_argument("--sort-into", default=None, metavar="OUT_DIR",
                   help="also put each photo into OUT_DIR/<class>/, as a hard link (a copy where the file system "
                        "has none); the photos are never moved or changed, a name already taken gets a suffix, and "
                        "a photo already there is not added again. OUT_DIR lies outside the folders of photos given "
                        "and the folders that hold the photos given by name")
    p.add_argument("--batch-size", type=options.positive_int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=options.non_negative_int, default=None,
                   help="threads that decode images ahead of the model (default: 1 on a CPU, none for a "
                        "single image; min(cpu count, batch size, 8) on CUDA)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (a .onnx file: auto, cpu, cuda or cuda:N, the GPU through "
                        "onnxruntime-gpu; auto takes it where that is installed)")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision, as in train.py (auto: bf16 on CPUs with native bf16 and on CUDA; for a "
                        ".onnx file in OpenVINO, auto lets it compute in bf16 on such CPUs and off keeps f32)")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                   help="what runs a .onnx file (openvino: an optional dependency, faster for INT8 files on CPUs)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror image")
    p.add_argument("--min-confidence", type=options.probability, default=None, metavar="P",
                   help="answer \"unknown\" for a photo whose top probability is below P, in place of the weights' "
                        "own \"not sure\" score and threshold (default: those the weights record, which answer 95%% "
                        "of their val photos; 0: always name a class)")
    p.add_argument("--cam", default=None, metavar="OUT_DIR",
                   help="also write a Grad-CAM heat map of each image to this folder (needs captum)")
    p.add_argument("--cam-class", default=None,
                   help="the class whose heat map --cam draws (default: the predicted one)")
    p.add_argument("--cam-layer", default="inception5b", choices=visualize.LAYERS,
                   help="the layer whose output --cam weighs")
    return p


def run(argv=None):
    try:
        return options.run_command(main, get_args_parser().parse_args(argv))
    except KeyboardInterrupt:  # outside the photos' loop (loading the model, say), which says what it kept
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(run())
