"""Classify photos with trained weights.

    python predict.py tulip.jpg                          # every class with its probability
    python predict.py photos/ more.jpg --output out.csv  # a table, also written as CSV or JSON
    python predict.py photos/ --output out.csv --sort-into sorted/  # a big folder: resumable, sorted by class
    python predict.py tulip.jpg --weights googlenet.onnx # through ONNX Runtime, without torch

A .pth checkpoint runs in PyTorch; a .onnx file from export.py (fp32 or INT8) runs in ONNX Runtime
(or OpenVINO with --runtime openvino) and never imports torch, which takes seconds to import. Both see
the same pixels: images.py's decoding and preprocessing, and the same softmax here, of the logits
divided by the temperature the weights record (calibrated probabilities). A photo whose "not sure"
score (the one the weights record: the top probability unless trained with --not-sure-score) is
below the weights' threshold, or whose top probability is below --min-confidence, is answered
"unknown", with its best guesses.
"""
import argparse
import os
import signal
import sys

import numpy as np
from tqdm import tqdm

from inference import images, visualize
from inference.calibration import SCORE_NAMES, UNKNOWN
from inference.classify import (
    CsvOutput,
    PhotoSorter,
    PredictionError,
    collect_images,
    decided_class,
    load_classifier,
    predict_batches,
    write_output,
)
from plumbing import options
from plumbing.stopping import StopRequest

# More photos than this with --output or --sort-into: a progress bar on stderr instead of the table
TABLE_ROWS = 50


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


def main(args):
    if args.output and not args.output.lower().endswith((".csv", ".json")):
        raise PredictionError(f"--output {args.output}: the file name must end in .csv or .json")
    if args.sort_into:
        check_sort_folder_outside(args.sort_into, args.images)
    files = collect_images(args.images)
    if args.sort_into:
        files = outside_sorted_folder(files, args.sort_into)
    if args.weights.lower().endswith(".onnx"):
        if args.cam:
            raise PredictionError("--cam needs the gradients of PyTorch weights: pass the .pth file the "
                                  ".onnx file was exported from")
        if args.amp in ("bf16", "fp16"):
            raise PredictionError(f"--amp {args.amp} applies to PyTorch weights: a .onnx file runs as it was "
                                  "exported; leave it out or pass the .pth file")
        if args.runtime == "openvino" and args.device not in ("auto", "cpu"):
            raise PredictionError(f"--device {args.device}: --runtime openvino runs a .onnx file on the CPU; "
                                  "leave --device out, or use --runtime onnxruntime (with onnxruntime-gpu)")
    elif args.runtime != "onnxruntime":
        raise PredictionError(f"--runtime {args.runtime} runs .onnx files and {args.weights} is PyTorch weights: "
                              "export it with export.py, or leave --runtime out")
    classifier = load_classifier(args.weights, args.class_indices, args.device, args.amp,
                                 warn=lambda line: print(line, file=sys.stderr), runtime=args.runtime)
    classifier.calibration = classifier.calibration.with_min_confidence(args.min_confidence)
    csv_output = args.output and args.output.lower().endswith(".csv")
    rows = CsvOutput(args.output, classifier.classes, files) if csv_output else None
    try:
        return classify(args, classifier, files, rows)
    finally:
        if rows:
            rows.close()


def check_sort_folder_outside(sort_into, paths):
    """A --sort-into folder inside the folder of photos given (a folder given, or the folder that
    holds a photo given by name) would be read as more photos by every later run over that folder
    (each photo twice, once as its link): refused."""
    sorted_folder = os.path.realpath(sort_into)
    for path in paths:
        folder = path if os.path.isdir(path) else os.path.dirname(path) or os.getcwd()
        if images.inside(sorted_folder, os.path.realpath(folder)):
            raise PredictionError(f"--sort-into {sort_into} lies inside {folder}, the photos' own folder: a later run "
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
        raise PredictionError(f"every photo given lies inside --sort-into {sort_into}: pass the photos' own folder "
                              "and another --sort-into folder")
    return kept


def classify(args, classifier, files, rows):
    """Classify the photos a batch at a time, writing and sorting each batch as it comes; the exit code."""
    classes, threshold, score = classifier.classes, classifier.min_confidence, classifier.calibration.score
    done = rows.classes_of(files) if rows else {}
    todo = [f for f in files if f not in done]
    if rows and (done or rows.torn):
        torn = "; its last row had been cut short and that photo is classified again" if rows.torn else ""
        print(f"{len(done):,} of {len(files):,} photos are in {args.output} already (delete it to start over), "
              f"{len(todo):,} to go{torn}")
    sorter = PhotoSorter(args.sort_into) if args.sort_into else None
    to_json = bool(args.output) and rows is None
    table = len(files) <= TABLE_ROWS or not (args.output or sorter)  # without either, the table is the result
    streamed_table = table and len(files) > TABLE_ROWS
    kept_files, kept_probabilities, kept_sureness, errors = [], [], [], []
    workers = (args.workers if args.workers is not None
               else images.default_workers(classifier.device_type, args.batch_size, items=len(todo)))
    classified, table_started = 0, False
    bar = tqdm(total=len(files), initial=len(done), unit="photo", desc="classify", file=sys.stderr,
               dynamic_ncols=True, disable=table)
    stop = StopRequest()
    try:
        with stop, bar:
            if sorter:  # photos classified by an earlier run (without --sort-into, maybe) are sorted too
                for f, class_name in done.items():
                    if stop.signal is not None:
                        break
                    errors.append(sort_error(sorter, f, class_name))
            batches = predict_batches(classifier, todo, args.batch_size, workers, args.tta)
            for batch, probabilities, sureness, batch_errors in batches if stop.signal is None else ():
                errors.extend(f"cannot read image {f} ({e}): is it a complete image file?"
                              for f, e in zip(batch, batch_errors, strict=True) if e)
                good = [i for i, e in enumerate(batch_errors) if not e]
                good_files = [batch[i] for i in good]
                good_probabilities, good_sureness = probabilities[good], sureness[good]
                if sorter:
                    errors.extend(sort_error(sorter, f, decided_class(classes, p, threshold, s))
                                  for f, p, s in zip(good_files, good_probabilities, good_sureness, strict=True))
                if rows:
                    # a full disk: SaveError
                    rows.append(good_files, classes, good_probabilities, threshold, good_sureness)
                if streamed_table and good_files:
                    print_table(good_files, classes, good_probabilities, threshold, width=max(map(len, todo)),
                                header=not table_started, sureness=good_sureness)
                    table_started = True
                if (table and not streamed_table) or to_json or args.cam:
                    kept_files.extend(good_files)
                    kept_probabilities.append(good_probabilities)
                    kept_sureness.append(good_sureness)
                classified += len(batch)
                bar.update(len(batch))
                if stop.signal is not None:
                    break
        interrupted = stop.signal
    except KeyboardInterrupt:  # a second Ctrl-C, in the middle of a batch
        interrupted = signal.SIGINT
    errors = [e for e in errors if e]
    if interrupted is not None:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"interrupted: {stopped_at(args, rows, sorter, len(done), classified, len(files))}", file=sys.stderr)
        return 128 + interrupted

    probabilities = np.concatenate(kept_probabilities) if kept_probabilities else np.zeros((0, len(classes)))
    sureness = np.concatenate(kept_sureness) if kept_sureness else np.zeros(0)
    if len(files) == 1 and kept_files:
        if decided_class(classes, probabilities[0], threshold, sureness[0]) == UNKNOWN:
            print(f"{UNKNOWN} (not sure): best guesses, the {SCORE_NAMES[score]}"
                  + ("" if score == "max_probability" else f" {sureness[0]:.4f}") + f" below {threshold:.4f}:")
        top = np.argsort(-probabilities[0], kind="stable")[: args.topk or len(classes)]
        width = max(len(c) for c in classes)
        for k in top.tolist():
            print(f"{classes[k]:<{width}}  {probabilities[0, k]:.4f}")
    elif table and kept_files:
        print_table(kept_files, classes, probabilities, threshold, width=max(map(len, kept_files)), sureness=sureness)
    if rows:
        if rows.written or done:
            print(f"predictions written to {args.output}")
    elif to_json and kept_files:
        write_output(args.output, kept_files, classes, probabilities, threshold, sureness)
        print(f"predictions written to {args.output}")
    if sorter:
        where = os.path.join(args.sort_into, "<class>", "")  # one slash, however --sort-into ends
        print(f"{sorter.linked + sorter.copied + sorter.already:,} photos sorted into {where} "
              f"({sorter.linked:,} linked, {sorter.copied:,} copied, {sorter.already:,} there already)")
    if args.cam and kept_files:
        written = visualize.write_cams(classifier.torch_model, kept_files, classifier.preprocessing,
                                       classes, probabilities, args.cam, args.cam_class, args.cam_layer)
        print(f"{len(written)} Grad-CAM heat map(s) ({args.cam_layer}) written to {args.cam}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


def sort_error(sorter, photo, class_name):
    problem = sorter.place(photo, class_name)
    return f"cannot sort {photo} into {os.path.join(sorter.root, class_name)}: {problem}" if problem else ""


def print_table(files, classes, probabilities, min_confidence, width, header=True, sureness=None):
    if header:
        print(f"{'file':<{width}}  {'class':<12} probability")
    scores = [None] * len(files) if sureness is None else sureness
    for f, p, s in zip(files, probabilities, scores, strict=True):
        print(f"{f:<{width}}  {decided_class(classes, p, min_confidence, s):<12} {p.max():.4f}")


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


def run(argv=None):
    try:
        return options.run_command(main, get_args_parser().parse_args(argv))
    except KeyboardInterrupt:  # outside the photos' loop (loading the model, say), which says what it kept
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(run())
