"""Classifying image files with a trained model, the same way for .pth weights (PyTorch) and .onnx
files (ONNX Runtime or OpenVINO, never importing torch): one preprocessing, one softmax."""
import csv
import io
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from inference import images
from plumbing.atomic import atomic_write_text
from plumbing.options import UserError


class PredictionError(UserError):
    """Bad input to predict.py: the message says what and what to do."""


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
        from inference.runtimes import load_onnx  # no torch on this path

        model, classes, preprocessing = load_onnx(weights, runtime=runtime, amp=amp)
        return Classifier(model, classes, preprocessing)
    # torch only here: importing it takes seconds that a .onnx file never pays
    from inference import checkpoint as ckpt
    from plumbing import device as dev

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

        from plumbing import device as dev

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
