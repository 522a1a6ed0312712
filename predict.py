"""Classify photos with trained weights.

    python predict.py tulip.jpg                          # every class with its probability
    python predict.py photos/ more.jpg --output out.csv  # a table, also written as CSV or JSON
    python predict.py tulip.jpg --weights googlenet.onnx # through ONNX Runtime, without torch

A .pth checkpoint runs in PyTorch; a .onnx file from export.py (fp32 or INT8) runs in ONNX Runtime
(or OpenVINO with --runtime openvino) and never imports torch, which takes seconds to import. Both see the same pixels: images.py's
decoding and preprocessing, and the same softmax here.
"""
import argparse
import csv
import io
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

import visualize
import images
import options
from atomic import atomic_write_text
from options import UserError


class PredictionError(UserError):
    """Bad input to predict.py: the message says what and what to do."""


def get_args_parser():
    p = argparse.ArgumentParser(description="Classify images with a trained GoogLeNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--weights", default=os.path.join("weights", "best.pth"),
                   help="a checkpoint from train.py, a plain state dict (then --class-indices names the classes), "
                        "or a .onnx file from export.py (run by ONNX Runtime, or --runtime)")
    p.add_argument("--class-indices", default="class_indices.json",
                   help="class names, used only when the weights file does not hold them")
    p.add_argument("--topk", type=options.positive_int, default=None, help="show only the K most likely classes for one image")
    p.add_argument("--output", default=None, help="also write the predictions to this .csv or .json file")
    p.add_argument("--batch-size", type=options.positive_int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=options.non_negative_int, default=None,
                   help="threads that decode images ahead of the model (default: 1 on a CPU, none for a "
                        "single image; min(cpu count, batch size, 8) on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision, as in train.py (auto: bf16 on CPUs with native bf16 and on CUDA; for a "
                        ".onnx file in OpenVINO, auto lets it compute in bf16 on such CPUs and off keeps f32)")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                   help="what runs a .onnx file (openvino: an optional dependency, faster for INT8 files on CPUs)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror image")
    p.add_argument("--cam", default=None, metavar="OUT_DIR",
                   help="also write a Grad-CAM heat map of each image to this folder (needs captum)")
    p.add_argument("--cam-class", default=None, help="the class whose heat map --cam draws (default: the predicted one)")
    p.add_argument("--cam-layer", default="inception5b", choices=visualize.LAYERS, help="the layer whose output --cam weighs")
    return p


@dataclass
class Classifier:
    """A trained model ready to classify: logits_of maps normalised float32 images N x 3 x H x W to
    logits N x classes (numpy both). torch_model is the PyTorch module of .pth weights (for
    Grad-CAM), None for a .onnx file."""

    logits_of: Callable
    classes: list
    preprocessing: images.Preprocessing
    device_type: str = "cpu"
    torch_model: Optional[object] = None

    def probabilities(self, pixels, tta=False):
        """Class probabilities N x classes of uint8 N x H x W x 3 images, preprocessed already;
        with tta, of the mean logits of each image and its mirror."""
        batch = images.normalize(pixels, self.preprocessing)
        logits = self.logits_of(batch)
        if tta:
            logits = (logits + self.logits_of(np.ascontiguousarray(batch[..., ::-1]))) / 2
        return softmax(logits)


def softmax(logits):
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load_classifier(weights, class_indices="class_indices.json", device="auto", amp="auto", warn=print,
                    runtime="onnxruntime"):
    """The Classifier of a .pth checkpoint (in PyTorch) or of a .onnx file (in `runtime`)."""
    if weights.lower().endswith(".onnx"):
        if not os.path.isfile(weights):
            raise PredictionError(f"weights file {weights} does not exist: export one with "
                                  f"python export.py --output {weights}, or pass --weights with the right path")
        from runtimes import load_onnx  # no torch on this path

        model, classes, preprocessing = load_onnx(weights, runtime=runtime, amp=amp)
        return Classifier(model, classes, preprocessing)
    # torch only here: importing it takes seconds that a .onnx file never pays
    import checkpoint as ckpt
    import device as dev

    placement = dev.place(device, amp)
    if placement.warning:
        warn(placement.warning)
    model, classes, preprocessing = ckpt.load_model(weights, class_indices, placement.device)
    return Classifier(TorchLogits(model, placement), classes, preprocessing, placement.device.type, model)


class TorchLogits:
    """A PyTorch model called like an ONNX Runtime session: numpy in, numpy logits out."""

    def __init__(self, model, placement):
        self.model, self.placement = model, placement

    def __call__(self, batch):
        import torch

        import device as dev

        x = torch.from_numpy(batch).to(self.placement.device, memory_format=torch.channels_last)
        with torch.inference_mode(), dev.autocast(self.placement.device, self.placement.amp_dtype):
            return self.model(x).float().cpu().numpy()


def collect_images(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = images.find_image_files(path)
            if not found:
                raise PredictionError(f"folder {path} holds no images ({', '.join(images.IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise PredictionError(f"image {path} does not exist: check the path")
    return files


def prepare(path, preprocessing):
    """(uint8 crop x crop x 3, '') for a readable image, (None, its error) for any other file."""
    try:
        return images.resize_and_crop(images.load_image(path), preprocessing), ""
    except Exception as e:  # reported per file after the run, never silently replaced
        return None, f"{type(e).__name__}: {e}"


def predict(classifier, files, batch_size=32, workers=1, tta=False):
    """(probabilities N x classes, errors) with errors[i] = '' for every readable file; unreadable
    files get a row of zeros. workers threads decode the next two batches while the model runs
    (Pillow decodes without the GIL); 0 decodes in this thread."""
    crop = classifier.preprocessing.crop
    probabilities, errors = [], []
    for prepared in _prepared_batches(files, classifier.preprocessing, batch_size, workers):
        pixels = np.stack([p if p is not None else np.zeros((crop, crop, 3), np.uint8) for p, _ in prepared])
        probabilities.append(classifier.probabilities(pixels, tta))
        errors.extend(e for _, e in prepared)
    return np.concatenate(probabilities), errors


def _prepared_batches(files, preprocessing, batch_size, workers):
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    if workers == 0:
        for batch in batches:
            yield [prepare(f, preprocessing) for f in batch]
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = deque()
        for batch in batches:
            ahead.append([pool.submit(prepare, f, preprocessing) for f in batch])
            if len(ahead) > 2:
                yield [f.result() for f in ahead.popleft()]
        while ahead:
            yield [f.result() for f in ahead.popleft()]


def write_output(path, files, classes, probabilities):
    rows = [(f, p) for f, p in zip(files, probabilities.tolist())]
    if path.lower().endswith(".json"):
        text = json.dumps([{"file": f, "class": classes[max(range(len(p)), key=p.__getitem__)],
                            "probability": max(p), "probabilities": dict(zip(classes, p))}
                           for f, p in rows], indent=2) + "\n"
    elif path.lower().endswith(".csv"):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file", "class", "probability"] + classes)
        for f, p in rows:
            best = max(range(len(p)), key=p.__getitem__)
            writer.writerow([f, classes[best], f"{p[best]:.6f}"] + [f"{v:.6f}" for v in p])
        text = out.getvalue()
    else:
        raise PredictionError(f"--output {path}: the file name must end in .csv or .json")
    atomic_write_text(path, text)


def main(args):
    if args.output and not args.output.lower().endswith((".csv", ".json")):
        raise PredictionError(f"--output {args.output}: the file name must end in .csv or .json")
    files = collect_images(args.images)
    if args.weights.lower().endswith(".onnx"):
        if args.cam:
            raise PredictionError("--cam needs the gradients of PyTorch weights: pass the .pth file the "
                                  ".onnx file was exported from")
        if args.amp in ("bf16", "fp16") or args.device not in ("auto", "cpu"):
            raise PredictionError(f"--amp {args.amp} --device {args.device} apply to PyTorch weights: a .onnx "
                                  "file runs on the CPU as it was exported; leave them out or pass the .pth file")
    elif args.runtime != "onnxruntime":
        raise PredictionError(f"--runtime {args.runtime} runs .onnx files and {args.weights} is PyTorch weights: "
                              "export it with export.py, or leave --runtime out")
    classifier = load_classifier(args.weights, args.class_indices, args.device, args.amp,
                                 warn=lambda line: print(line, file=sys.stderr), runtime=args.runtime)
    workers = (args.workers if args.workers is not None
               else images.default_workers(classifier.device_type, args.batch_size, items=len(files)))
    probabilities, errors = predict(classifier, files, args.batch_size, workers, args.tta)

    classes = classifier.classes
    good = [i for i, e in enumerate(errors) if not e]
    if len(files) == 1 and good:
        top = np.argsort(-probabilities[0], kind="stable")[: args.topk or len(classes)]
        width = max(len(c) for c in classes)
        for k in top.tolist():
            print(f"{classes[k]:<{width}}  {probabilities[0, k]:.4f}")
    elif good:
        width = max(len(files[i]) for i in good)
        print(f"{'file':<{width}}  {'class':<12} probability")
        for i in good:
            k = int(np.argmax(probabilities[i]))
            print(f"{files[i]:<{width}}  {classes[k]:<12} {probabilities[i, k]:.4f}")
    if args.output and good:
        write_output(args.output, [files[i] for i in good], classes, probabilities[good])
        print(f"predictions written to {args.output}")
    if args.cam and good:
        written = visualize.write_cams(classifier.torch_model, [files[i] for i in good], classifier.preprocessing,
                                 classes, probabilities[good], args.cam, args.cam_class, args.cam_layer)
        print(f"{len(written)} Grad-CAM heat map(s) ({args.cam_layer}) written to {args.cam}")
    for f, e in zip(files, errors):
        if e:
            print(f"error: cannot read image {f} ({e}): is it a complete image file?", file=sys.stderr)
    return 1 if len(good) < len(files) else 0


def run(argv=None):
    return options.run_command(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
