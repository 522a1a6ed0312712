"""Export trained weights to ONNX and check the file in ONNX Runtime before writing it.

    python export.py --weights weights/best.pth --output googlenet.onnx
    python predict.py tulip.jpg --weights googlenet.onnx      # runs in ONNX Runtime

The graph is the eval-mode network without the aux heads: input ``images`` (N x 3 x H x W, float32,
normalised; N is free), output ``logits`` (N x classes). The class names, the image sizes and the
normalisation travel in the file's metadata, so the .onnx file is all predict.py needs.
"""
import argparse
import json
import sys

import torch

import checkpoint as ckpt
import options
from atomic import atomic_write
from options import UserError
from runtimes import OnnxModel

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
    return p


def export(model, classes, preprocessing, variant, output, check_images=4, log=print):
    """Write model (eval, no aux heads, CPU) to output as ONNX with its metadata; returns the largest
    probability difference ONNX Runtime showed against PyTorch. The file is written only if it checks out."""
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
                          f"{TOLERANCE:g}): {output} was not written; report this with your torch and "
                          "onnxruntime versions")
    atomic_write(output, lambda f: f.write(blob), hint="pass --output with a writable path, or free some disk space")
    return worst


def main(args):
    require_onnx()
    if not args.output.lower().endswith(".onnx"):
        raise ExportError(f"--output {args.output}: the file name must end in .onnx")
    model, classes, preprocessing = ckpt.load_model(args.weights, args.class_indices, torch.device("cpu"))
    variant = model.variant
    print(f"exporting {args.weights} ({variant} variant, {len(classes)} classes, {preprocessing.crop} px) "
          f"to ONNX opset {OPSET}")
    export(model, classes, preprocessing, variant, args.output, args.check_images)
    print(f"wrote {args.output}: predict with  python predict.py IMAGE --weights {args.output}")
    return 0


def run(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(run())
