"""Export trained weights to ONNX, fp32 or INT8, and check the file before writing it.

    python export.py --weights weights/best.pth --output googlenet.onnx
    python export.py --weights weights/best.pth --int8 --output googlenet-int8.onnx
    python predict.py tulip.jpg --weights googlenet.onnx      # runs in ONNX Runtime

The graph is the eval-mode network without the aux heads: input ``images`` (N x 3 x H x W, float32,
normalised; N is free), output ``logits`` (N x classes). The class names, the image sizes and the
normalisation travel in the file's metadata, so the .onnx file is all predict.py needs.

--int8 is ONNX Runtime's static post-training quantization (QDQ format, per-channel int8 weights
in 7 bits, uint8 activations), calibrated on training photos of the run, never its val photos. Before the
file is written, the fp32 and INT8 models are evaluated on the run's val photos: it is refused when
INT8 loses more than --max-accuracy-drop points.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from inference import checkpoint as ckpt
from inference import classify, images
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
        raise ExportError(MISSING)


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
                   help="with --int8: how many training photos calibrate the activations' ranges")
    p.add_argument("--data-path", default=None,
                   help="with --int8: the run's data (default: the --data-path its checkpoint records)")
    p.add_argument("--max-accuracy-drop", type=options.non_negative_float, default=1.0,
                   help="with --int8: refuse to write a file that loses more val accuracy than this, in points")
    return p


def export(model, classes, preprocessing, variant, output, check_images=4, log=print):
    """Write model (eval, no aux heads, CPU) to output as ONNX with its metadata; returns the largest
    probability difference ONNX Runtime showed against PyTorch. The file is written only if it checks out."""
    blob, worst = to_onnx(model, classes, preprocessing, variant, check_images, log)
    atomic_write(output, lambda f: f.write(blob), hint="pass --output with a writable path, or free some disk space")
    return worst


def to_onnx(model, classes, preprocessing, variant, check_images=4, log=print):
    """(the fp32 ONNX file's bytes, the largest probability difference against PyTorch), checked."""
    import onnx

    crop = preprocessing.crop
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.randn(2, 3, crop, crop)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=OPSET,
                                verbose=False)
    proto = program.model_proto
    metadata = {"classes": json.dumps(classes), "variant": variant, "val_resize": str(preprocessing.resize),
                "val_crop": str(crop), "mean": json.dumps(list(preprocessing.mean)),
                "std": json.dumps(list(preprocessing.std))}
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
    """An INT8 file's bytes and what was measured before it was written."""

    blob: bytes
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float  # the share of val photos whose top class is the same in both
    val_images: int
    calibration_images: int


class Calibration:
    """onnxruntime.quantization's CalibrationDataReader: batches of preprocessed training photos."""

    def __init__(self, files, preprocessing, batch_size=16):
        self.files, self.preprocessing, self.batch_size = files, preprocessing, batch_size
        self.position = 0

    def get_next(self):
        if self.position >= len(self.files):
            return None
        chunk = self.files[self.position:self.position + self.batch_size]
        self.position += len(chunk)
        pixels = np.stack([images.resize_and_crop(images.load_image(f), self.preprocessing) for f in chunk])
        return {"images": images.normalize(pixels, self.preprocessing)}

    def rewind(self):
        self.position = 0


def run_photos(loaded, data_path, log=print):
    """(training photo paths, val (path, class) samples) of the run a checkpoint comes from."""
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
    return [p for p, _ in found.train], found.val, root


def accuracy_on(model_bytes, classes, preprocessing, samples):
    """(accuracy, top classes) of an ONNX model on (path, class) samples, through predict.py's path."""
    from inference.runtimes import OnnxModel

    classifier = classify.Classifier(OnnxModel(model_bytes), classes, preprocessing)
    probabilities, errors = classify.predict(classifier, [p for p, _ in samples], batch_size=32, workers=1)
    top = probabilities.argmax(1)
    kept = [i for i, e in enumerate(errors) if not e]
    return float(np.mean([top[i] == samples[i][1] for i in kept])), top


def quantize(blob, classes, preprocessing, train_files, val_samples, calibration_images, log=print):
    """INT8 bytes of an fp32 ONNX file, calibrated on calibration_images of train_files (an even
    spread of them, the same every time), with fp32 and INT8 measured on val_samples."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step = max(1, len(train_files) // calibration_images)
    chosen = train_files[::step][:calibration_images]
    log(f"INT8: calibrating on {len(chosen)} training photos, evaluating on {len(val_samples)} val photos")
    with tempfile.TemporaryDirectory(prefix="googlenet-int8-") as folder:
        fp32, ready, int8 = (os.path.join(folder, n) for n in ("fp32.onnx", "ready.onnx", "int8.onnx"))
        with open(fp32, "wb") as f:
            f.write(blob)
        quant_pre_process(fp32, ready)  # shapes and constant folding, as ONNX Runtime recommends first
        quantize_static(ready, int8, Calibration(chosen, preprocessing), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        # 7-bit weights: CPUs without VNNI multiply uint8 by int8 in int16 sums that
                        # saturate with 8-bit weights (top-1 agreement with fp32 96.6% -> 98.3% here)
                        reduce_range=True)
        with open(int8, "rb") as f:
            int8_blob = f.read()
    fp32_accuracy, fp32_top = accuracy_on(blob, classes, preprocessing, val_samples)
    int8_accuracy, int8_top = accuracy_on(int8_blob, classes, preprocessing, val_samples)
    return Quantized(int8_blob, fp32_accuracy, int8_accuracy, float(np.mean(fp32_top == int8_top)),
                     len(val_samples), len(chosen))


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
    model, classes, preprocessing = ckpt.load_model(args.weights, args.class_indices, torch.device("cpu"))
    variant = model.variant
    print(f"exporting {args.weights} ({variant} variant, {len(classes)} classes, {preprocessing.crop} px) "
          f"to ONNX opset {OPSET}" + (", then INT8" if args.int8 else ""))
    if not args.int8:
        export(model, classes, preprocessing, variant, args.output, args.check_images)
    else:
        train_files, val_samples, root = run_photos(ckpt.load_checkpoint(args.weights), args.data_path)
        blob, _ = to_onnx(model, classes, preprocessing, variant, args.check_images)
        result = quantize(blob, classes, preprocessing, train_files, val_samples, args.calibration_images)
        change = 100 * (result.int8_accuracy - result.fp32_accuracy)  # not -drop: that prints -0.0 for no change
        drop = -change
        print(f"val accuracy on {result.val_images} photos: fp32 {result.fp32_accuracy:.4f}, INT8 "
              f"{result.int8_accuracy:.4f} ({change:+.1f} points); the same top class for {100 * result.agreement:.1f}%")
        if drop > args.max_accuracy_drop:
            raise ExportError(f"INT8 loses {drop:.1f} points of val accuracy (more than --max-accuracy-drop "
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
