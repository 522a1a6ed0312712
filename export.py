"""Export trained weights to ONNX, fp32 or INT8, and check the file before writing it.

    python export.py --weights weights/best.pth --output googlenet.onnx
    python export.py --weights weights/best.pth --int8 --output googlenet-int8.onnx
    python predict.py tulip.jpg --weights googlenet.onnx      # runs in ONNX Runtime

The graph is the eval-mode network without the aux heads: input ``images`` (N x 3 x H x W, float32,
normalised; N is free), output ``logits`` (N x classes), and for weights whose "not sure" score is
the rotation score a second output ``rotation`` (N: model.rotation_agreement, which runs the
network on the four quarter turns of each image). The class names, the image sizes, the
normalisation, the temperature that calibrates the probabilities, the "not sure" score and its
threshold travel in the file's metadata, so the .onnx file is all predict.py needs.

--int8 is ONNX Runtime's static post-training quantization (QDQ format, per-channel int8 weights
in 7 bits, uint8 activations), calibrated on training photos of the run spread evenly over its
classes, never its val photos. Before the file is written, the fp32 and INT8 models are evaluated on
the run's readable val photos: it is refused when INT8 loses more than --max-accuracy-drop points.
"""
import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from inference import calibration, classify, images
from inference import checkpoint as ckpt
from inference.runtimes import OnnxModel
from plumbing import options
from plumbing.atomic import atomic_write
from plumbing.options import UserError

OPSET = 18  # run by every ONNX Runtime since 1.14 (2023)
TOLERANCE = 1e-4  # largest allowed difference between ONNX Runtime's and PyTorch's probabilities
MISSING = "ONNX export and inference need onnx, onnxscript and onnxruntime, optional dependencies: " \
          "pip install onnx onnxscript onnxruntime"


class ExportError(UserError):
    """An export that cannot be done or did not check out: the message says what to do."""


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError(MISSING) from None


def get_args_parser():
    p = argparse.ArgumentParser(description="Export trained GoogLeNet weights to ONNX and check them in ONNX Runtime.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="weights/best.pth", help="a checkpoint written by train.py")
    p.add_argument("--output", default="googlenet.onnx", help="the .onnx file to write")
    p.add_argument("--class-indices", default="class_indices.json",
                   help="class names, used only when the weights file does not hold them")
    p.add_argument("--check-images", type=options.positive_int, default=4,
                   help="random images compared between PyTorch and ONNX Runtime after the export")
    p.add_argument("--int8", action="store_true",
                   help="quantize to INT8 (static, QDQ, per-channel weights), calibrated on training photos")
    p.add_argument("--calibration-images", type=options.positive_int, default=300,
                   help="with --int8: how many training photos calibrate the activations' ranges (evenly over the "
                        "classes; at most the run's training photos)")
    p.add_argument("--data-path", default=None,
                   help="with --int8: the run's data (default: the --data-path its checkpoint records)")
    p.add_argument("--max-accuracy-drop", type=options.non_negative_float, default=1.0,
                   help="with --int8: refuse to write a file that loses more val accuracy than this, in points")
    return p


def export(model, classes, preprocessing, variant, output, check_images=4, log=print, calibrated=None):
    """Write model (eval, no aux heads, CPU) to output as ONNX with its metadata; returns the largest
    probability difference ONNX Runtime showed against PyTorch. The file is written only if it checks out."""
    blob, worst = to_onnx(model, classes, preprocessing, variant, check_images, log, calibrated)
    atomic_write(output, lambda f: f.write(blob), hint="pass --output with a writable path, or free some disk space")
    return worst


class WithRotation(torch.nn.Module):
    """The graph of weights whose "not sure" score is the rotation score: the logits, and the rotation
    head's agreement on the image's four quarter turns."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), self.model.rotation_agreement(x)


def to_onnx(model, classes, preprocessing, variant, check_images=4, log=print, calibrated=None):
    """(the fp32 ONNX file's bytes, the largest probability difference against PyTorch), checked.
    calibrated: the weights' calibration.Calibration (temperature, "not sure" score, threshold), into
    the metadata; the rotation score adds the output "rotation", checked too (as exp(agreement), a
    probability)."""
    import onnx

    crop = preprocessing.crop
    calibrated = calibrated or calibration.Calibration()
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    graph = WithRotation(model).eval() if calibrated.needs_rotation else model
    outputs = ["logits", "rotation"] if calibrated.needs_rotation else ["logits"]
    example = torch.randn(2, 3, crop, crop)
    program = torch.onnx.export(graph, (example,), dynamo=True, input_names=["images"], output_names=outputs,
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
                                verbose=False)
    proto = program.model_proto
    metadata = {"classes": json.dumps(classes), "variant": variant, "val_resize": str(preprocessing.resize),
                "val_crop": str(crop), "mean": json.dumps(list(preprocessing.mean)),
                "std": json.dumps(list(preprocessing.std)), **calibrated.metadata()}
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()

    session = OnnxModel(blob)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in (1, check_images):  # one image, and a batch: the batch size really is free
        images = torch.randn(n, 3, crop, crop, generator=generator)
        with torch.inference_mode():
            expected = torch.softmax(model(images), dim=1)
        got = torch.softmax(torch.from_numpy(session(images.numpy())), dim=1)
        worst = max(worst, (got - expected).abs().max().item())
        if calibrated.needs_rotation:
            with torch.inference_mode():
                expected = model.rotation_agreement(images).exp()
            got = torch.from_numpy(session.with_rotation(images.numpy())[1]).exp()
            worst = max(worst, (got - expected).abs().max().item())
    log(f"ONNX Runtime against PyTorch on {1 + check_images} random images: largest probability difference {worst:.2e}")
    if worst > TOLERANCE:
        raise ExportError(f"ONNX Runtime's probabilities differ from PyTorch's by {worst:.2e} (more than "
                          f"{TOLERANCE:g}): the file was not written; report this with your torch and "
                          "onnxruntime versions")
    return blob, worst


# ---------------------------------------------------------------------------------------------
# INT8
# ---------------------------------------------------------------------------------------------
@dataclass
class Quantized:
    """An INT8 file's bytes and what was measured before it was written, in whole val photos:
    those that could be read, and of them the ones each model classifies right."""

    blob: bytes
    fp32_correct: int
    int8_correct: int
    agreeing: int  # val photos whose top class is the same in both
    val_images: int  # the readable val photos, on which every figure here is counted
    calibration_images: int  # the readable training photos that calibrated it

    @property
    def fp32_accuracy(self):
        return self.fp32_correct / self.val_images

    @property
    def int8_accuracy(self):
        return self.int8_correct / self.val_images

    @property
    def agreement(self):
        return self.agreeing / self.val_images

    def loses_more_than(self, points):
        """Whether INT8's accuracy is more than `points` below fp32's. Compared in whole photos (and
        the points as the decimal they were written as): 89 of 100 against 90 is a 1-point drop,
        where the difference of the two accuracies in floats is 1.0000000000000009 points."""
        return 100 * (self.fp32_correct - self.int8_correct) > Fraction(str(points)) * self.val_images


class QuantizationReader:
    """onnxruntime.quantization's CalibrationDataReader (INT8's activation ranges, not the temperature of
    inference/calibration.py): batches of preprocessed training photos.
    A photo that cannot be decoded (a truncated JPEG, say, which training skips too) is left out
    and kept in ``skipped`` with the reason."""

    def __init__(self, files, preprocessing, batch_size=16):
        self.files, self.preprocessing, self.batch_size = files, preprocessing, batch_size
        self.position = 0
        self.skipped = {}  # path: why it could not be read

    def get_next(self):
        while self.position < len(self.files):
            chunk = self.files[self.position:self.position + self.batch_size]
            self.position += len(chunk)
            pixels = []
            for path in chunk:
                prepared, error = classify.prepare(path, self.preprocessing)
                if prepared is None:
                    self.skipped[path] = error
                else:
                    pixels.append(prepared)
            if pixels:
                return {"images": images.normalize(np.stack(pixels), self.preprocessing)}
        if len(self.skipped) == len(self.files):
            path, error = next(iter(self.skipped.items()))
            raise ExportError(f"none of the {len(self.files)} calibration photos could be read ({path}: {error}): "
                              "replace the unreadable training photos, or pass --data-path with the run's data")
        return None

    def rewind(self):
        self.position = 0


def run_photos(loaded, data_path, log=print):
    """(training (path, class) samples, val (path, class) samples, data folder) of the run a checkpoint comes from."""
    from training import data

    recorded = (loaded.get("args") or {}).get("data_path")
    root = data_path or recorded
    if not root:
        raise ExportError("the checkpoint records no data path: pass --data-path with the run's data")
    hint = (f"the data the run was trained on ({recorded}) is not there: pass --data-path with it"
            if not data_path else None)
    found = data.find_data(root, recorded_split=loaded.get("split"), missing_hint=hint, log=lambda *a: None)
    if found.classes != loaded.get("classes", found.classes):
        raise ExportError(f"{root} holds classes {found.classes}, the weights {loaded['classes']}: pass --data-path "
                          "with the run's data")
    return found.train, found.val, root


def quantization_photos(train_samples, count, seed=0):
    """`count` of the (path, class) training samples, as evenly spread over the classes as their
    sizes allow (a class with fewer photos gives all it has, the others make up the rest), drawn at
    random within each class with a fixed seed: the same every time. The training photos are sorted
    by class, so every n-th of them would leave out the last classes when count is large."""
    if count > len(train_samples):
        raise ExportError(f"--calibration-images {count}: the run has only {len(train_samples)} training photos; "
                          f"pass --calibration-images {len(train_samples)} or fewer")
    by_class = {}
    for path, target in sorted(train_samples):
        by_class.setdefault(target, []).append(path)
    for target, files in by_class.items():
        random.Random(f"calibration:{seed}:{target}").shuffle(files)
    chosen, depth = [], 0
    while len(chosen) < count:  # one photo of each class in turn
        for target in sorted(by_class):
            if depth < len(by_class[target]) and len(chosen) < count:
                chosen.append((by_class[target][depth], target))
        depth += 1
    return chosen


def top_classes(model_bytes, classes, preprocessing, files):
    """(top class of each file, errors: '' for each readable file) of an ONNX model, through predict.py's path."""
    from inference.runtimes import OnnxModel

    classifier = classify.Classifier(OnnxModel(model_bytes), classes, preprocessing)
    probabilities, errors = classify.predict(classifier, files, batch_size=32, workers=1)
    return probabilities.argmax(1), errors


def described(skipped):
    """(path, why) pairs as one line's list."""
    return "; ".join(f"{path} ({error})" for path, error in skipped)


def quantize(blob, classes, preprocessing, quantization_samples, val_samples, log=print):
    """INT8 bytes of an fp32 ONNX file, calibrated on quantization_samples (training (path, class)
    samples, see quantization_photos), with fp32 and INT8 measured on the readable val_samples."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    files = [p for p, _ in val_samples]
    fp32_top, errors = top_classes(blob, classes, preprocessing, files)
    readable = [i for i, error in enumerate(errors) if not error]
    unread = [(files[i], error) for i, error in enumerate(errors) if error]
    if not readable:  # an accuracy of nothing is no check: the file would go out unmeasured
        raise ExportError(f"none of the {len(files)} val photos could be read ({unread[0][0]}: {unread[0][1]}), "
                          "so the INT8 file's accuracy cannot be checked: it was not written; replace the "
                          "unreadable photos, or pass --data-path with the run's data")
    if unread:
        log(f"INT8: left out {len(unread)} unreadable val photo(s): " + described(unread))
    per_class = [sum(1 for _, k in quantization_samples if k == c) for c in range(len(classes))]
    spread = (f"{min(per_class)}" if min(per_class) == max(per_class) else f"{min(per_class)} to {max(per_class)}")
    log(f"INT8: calibrating on {len(quantization_samples)} training photos ({spread} of each of the {len(classes)} "
        f"classes), evaluating on {len(readable)} val photos")
    reader = QuantizationReader([p for p, _ in quantization_samples], preprocessing)
    with tempfile.TemporaryDirectory(prefix="googlenet-int8-") as folder:
        fp32, ready, int8 = (os.path.join(folder, n) for n in ("fp32.onnx", "ready.onnx", "int8.onnx"))
        with open(fp32, "wb") as f:
            f.write(blob)
        quant_pre_process(fp32, ready)  # shapes and constant folding, as ONNX Runtime recommends first
        quantize_static(ready, int8, reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        # 7-bit weights: CPUs without VNNI multiply uint8 by int8 in int16 sums that
                        # saturate with 8-bit weights (top-1 agreement with fp32 96.6% -> 98.3% here)
                        reduce_range=True)
        with open(int8, "rb") as f:
            int8_blob = f.read()
    if reader.skipped:
        log(f"INT8: skipped {len(reader.skipped)} unreadable calibration photo(s): "
            + described(reader.skipped.items()))
    int8_top, _ = top_classes(int8_blob, classes, preprocessing, files)
    labels = [k for _, k in val_samples]
    return Quantized(int8_blob, sum(int(fp32_top[i] == labels[i]) for i in readable),
                     sum(int(int8_top[i] == labels[i]) for i in readable),
                     sum(int(fp32_top[i] == int8_top[i]) for i in readable), len(readable),
                     len(quantization_samples) - len(reader.skipped))


def with_metadata(blob, extra):
    """The ONNX file's bytes with more metadata entries."""
    import onnx

    proto = onnx.load_from_string(blob)
    for key, value in extra.items():
        proto.metadata_props.add(key=key, value=str(value))
    return proto.SerializeToString()


def main(args):
    require_onnx()
    if not args.output.lower().endswith(".onnx"):
        raise ExportError(f"--output {args.output}: the file name must end in .onnx")
    loaded = ckpt.load_checkpoint(args.weights)
    model, classes, preprocessing = ckpt.load_model(args.weights, args.class_indices, torch.device("cpu"), loaded)
    calibrated = calibration.of_checkpoint(loaded)
    if calibrated.needs_rotation and model.rotation is None:
        raise ExportError(f"{args.weights} records the rotation score for \"not sure\" but has no rotation head: "
                          "pass weights trained with --rotation-weight")
    variant = model.variant
    score = "" if calibrated.score == calibration.SCORES[0] else f" of the {calibrated.score} score"
    print(f"exporting {args.weights} ({variant} variant, {len(classes)} classes, {preprocessing.crop} px, "
          f"temperature {calibrated.temperature:.4g}, \"not sure\" below {calibrated.min_confidence:.4g}{score}) "
          f"to ONNX opset {OPSET}" + (", then INT8" if args.int8 else ""))
    if not args.int8:
        export(model, classes, preprocessing, variant, args.output, args.check_images, calibrated=calibrated)
    else:
        train_samples, val_samples, root = run_photos(loaded, args.data_path)
        chosen = quantization_photos(train_samples, args.calibration_images)  # before the minutes of work
        blob, _ = to_onnx(model, classes, preprocessing, variant, args.check_images, calibrated=calibrated)
        result = quantize(blob, classes, preprocessing, chosen, val_samples)
        # whole photos: +0.0, never -0.0, when nothing changed
        change = 100 * (result.int8_correct - result.fp32_correct) / result.val_images
        print(f"val accuracy on {result.val_images} photos: fp32 {result.fp32_accuracy:.4f}, INT8 "
              f"{result.int8_accuracy:.4f} ({change:+.1f} points); the same top class for "
              f"{100 * result.agreement:.1f}%")
        if result.loses_more_than(args.max_accuracy_drop):
            raise ExportError(f"INT8 loses {-change:.1f} points of val accuracy (more than --max-accuracy-drop "
                              f"{args.max_accuracy_drop:g}): {args.output} was not written; calibrate on more photos "
                              "(--calibration-images) or keep the fp32 export")
        blob = with_metadata(result.blob, {
            "quantization": "int8: ONNX Runtime static post-training quantization, QDQ, per-channel int8 "
                            "weights (7-bit range), uint8 activations, MinMax calibration",
            "calibration": f"{result.calibration_images} training photos of {root}",
            "fp32_val_accuracy": f"{result.fp32_accuracy:.4f}", "int8_val_accuracy": f"{result.int8_accuracy:.4f}",
            "top1_agreement": f"{result.agreement:.4f}", "val_images": result.val_images})
        atomic_write(args.output, lambda f: f.write(blob),
                     hint="pass --output with a writable path, or free some disk space")
    print(f"wrote {args.output}: predict with  python predict.py IMAGE --weights {args.output}")
    return 0


def run(argv=None):
    return options.run_command(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
