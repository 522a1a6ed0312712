"""Classify photos with trained weights.

    python predict.py tulip.jpg                          # every class with its probability
    python predict.py photos/ more.jpg --output out.csv  # a table, also written as CSV or JSON
    python predict.py tulip.jpg --weights googlenet.onnx # through ONNX Runtime, without torch

A .pth checkpoint runs in PyTorch; a .onnx file from export.py (fp32 or INT8) runs in ONNX Runtime
(or OpenVINO with --runtime openvino) and never imports torch, which takes seconds to import. Both see the same pixels: images.py's
decoding and preprocessing, and the same softmax here.
"""
import argparse
import os
import sys

import numpy as np

from inference import images, visualize
from inference.classify import PredictionError, collect_images, load_classifier, predict, write_output
from plumbing import options


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
