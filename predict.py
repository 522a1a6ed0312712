"""Classify flower photos with trained weights.

    python predict.py tulip.jpg                          # every class with its probability
    python predict.py photos/ more.jpg --output out.csv  # a table, also written as CSV or JSON
"""
import argparse
import csv
import io
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

import cam
import checkpoint as ckpt
import data
import device as dev
import export
import options
from model import GoogLeNet, logits_with_mirror


class PredictionError(Exception):
    """Bad input to predict.py: the message says what and what to do."""


def get_args_parser():
    p = argparse.ArgumentParser(description="Classify images with a trained GoogLeNet.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--weights", default=os.path.join("weights", "best.pth"),
                   help="a checkpoint from train.py, a plain state dict (then --class-indices names the classes), "
                        "or a .onnx file from export.py (run by ONNX Runtime)")
    p.add_argument("--class-indices", default="class_indices.json",
                   help="class names, used only when the weights file does not hold them")
    p.add_argument("--topk", type=options.positive_int, default=None, help="show only the K most likely classes for one image")
    p.add_argument("--output", default=None, help="also write the predictions to this .csv or .json file")
    p.add_argument("--batch-size", type=options.positive_int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=options.non_negative_int, default=None,
                   help="image decoding processes (default: 1 on a CPU, min(cpu count, 8) on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision, as in train.py (auto: bf16 on CPUs with native bf16 and on CUDA)")
    p.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror image")
    p.add_argument("--cam", default=None, metavar="OUT_DIR",
                   help="also write a Grad-CAM heat map of each image to this folder (needs captum)")
    p.add_argument("--cam-class", default=None, help="the class whose heat map --cam draws (default: the predicted one)")
    p.add_argument("--cam-layer", default="inception5b", choices=cam.LAYERS, help="the layer whose output --cam weighs")
    return p


def collect_images(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                           if f.lower().endswith(data.IMAGE_EXTENSIONS))
            if not found:
                raise PredictionError(f"folder {path} holds no images ({', '.join(data.IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise PredictionError(f"image {path} does not exist: check the path")
    return files


class ImageFiles(Dataset):
    """Decoded, resized images; an unreadable file gives an empty tensor and its error message."""

    def __init__(self, files, transform, size):
        self.files, self.transform, self.size = files, transform, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            return self.transform(data.load_image(self.files[index])), ""
        except Exception as e:  # reported per file after the run, never silently replaced
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def default_workers(num_files, device):
    """Decoding processes: on a CPU one, overlapping decoding with the compute (none for one file)."""
    if device.type == "cuda":
        return min(os.cpu_count() or 1, 8)
    return min(1, num_files - 1)


def load_model(weights, class_indices, device):
    loaded = ckpt.load_checkpoint(weights)
    state_dict = ckpt.clean_state_dict(loaded["model"])
    classes = loaded.get("classes") or ckpt.read_class_indices(class_indices)
    variant = loaded.get("variant") or ckpt.guess_variant(state_dict)
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, variant=variant)
    # Only weights with this model's layers can be for another class count; for any other network
    # (a ResNet has an fc.weight too) load_weights below names the keys that do not fit.
    if (set(model.state_dict()) <= set(state_dict) and "fc.weight" in state_dict
            and state_dict["fc.weight"].shape[0] != len(classes)):
        raise ckpt.CheckpointError(f"{weights} is for {state_dict['fc.weight'].shape[0]} classes but "
                                   f"{class_indices} names {len(classes)}: use the class index file "
                                   "written with these weights")
    ckpt.load_weights(model, state_dict, weights)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, classes, preprocessing_of(loaded)


def preprocessing_of(loaded):
    """(mean, std, resize, crop) recorded in a checkpoint; older files record one image_size for both."""
    mean, std = tuple(loaded.get("mean", data.MEAN)), tuple(loaded.get("std", data.STD))
    crop = int(loaded.get("val_crop") or loaded.get("image_size") or data.IMAGE_SIZE)
    return mean, std, int(loaded.get("val_resize") or crop), crop


@torch.inference_mode()
def predict(model, files, preprocessing, device, batch_size, workers, amp_dtype=None, tta=False):
    """(probabilities N x classes, errors) with errors[i] = '' for every readable file."""
    mean, std, resize, crop = preprocessing
    transform = data.build_transforms(train=False, val_resize=resize, val_crop=crop)
    loader = DataLoader(ImageFiles(files, transform, crop), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    probabilities, errors = [], []
    for images, batch_errors in loader:
        images = data.normalize_batch(images.to(device, non_blocking=True), mean, std, channels_last=True)
        with dev.autocast(device, amp_dtype):
            logits = logits_with_mirror(model, images) if tta else model(images)
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
        errors.extend(batch_errors)
    return torch.cat(probabilities), errors


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
    ckpt.atomic_write_text(path, text)


def main(args):
    if args.output and not args.output.lower().endswith((".csv", ".json")):
        raise PredictionError(f"--output {args.output}: the file name must end in .csv or .json")
    files = collect_images(args.images)
    if args.weights.lower().endswith(".onnx"):
        if args.cam:
            raise PredictionError("--cam needs the gradients of PyTorch weights: pass the .pth file the "
                                  ".onnx file was exported from")
        if args.amp in ("bf16", "fp16") or args.device not in ("auto", "cpu"):
            raise PredictionError(f"--amp {args.amp} --device {args.device} apply to PyTorch weights: ONNX Runtime "
                                  "runs a .onnx file on the CPU in fp32; leave them out or pass the .pth file")
        if not os.path.isfile(args.weights):
            raise PredictionError(f"weights file {args.weights} does not exist: export one with "
                                  f"python export.py --output {args.weights}, or pass --weights with the right path")
        model, classes, preprocessing = export.load_onnx(args.weights)
        device, amp_dtype = torch.device("cpu"), None  # ONNX Runtime runs it, on the CPU in fp32
    else:
        device = dev.pick_device(args.device)
        dev.tune_backends(device)
        amp_dtype = dev.amp_dtype(device, args.amp)
        warning = dev.describe_precision(device, amp_dtype)[1]
        if warning:
            print(warning, file=sys.stderr)
        model, classes, preprocessing = load_model(args.weights, args.class_indices, device)
    workers = args.workers if args.workers is not None else default_workers(len(files), device)
    probabilities, errors = predict(model, files, preprocessing, device, args.batch_size, workers,
                                    amp_dtype, args.tta)

    good = [i for i, e in enumerate(errors) if not e]
    if len(files) == 1 and good:
        top = torch.argsort(probabilities[0], descending=True)[: args.topk or len(classes)]
        width = max(len(c) for c in classes)
        for k in top.tolist():
            print(f"{classes[k]:<{width}}  {probabilities[0, k].item():.4f}")
    elif good:
        width = max(len(files[i]) for i in good)
        print(f"{'file':<{width}}  {'class':<12} probability")
        for i in good:
            p, k = probabilities[i].max(dim=0)
            print(f"{files[i]:<{width}}  {classes[k]:<12} {p.item():.4f}")
    if args.output and good:
        write_output(args.output, [files[i] for i in good], classes, probabilities[good])
        print(f"predictions written to {args.output}")
    if args.cam and good:
        written = cam.write_cams(model, [files[i] for i in good], preprocessing, classes, probabilities[good],
                                 args.cam, args.cam_class, args.cam_layer, device)
        print(f"{len(written)} Grad-CAM heat map(s) ({args.cam_layer}) written to {args.cam}")
    for f, e in zip(files, errors):
        if e:
            print(f"error: cannot read image {f} ({e}): is it a complete image file?", file=sys.stderr)
    return 1 if len(good) < len(files) else 0


def run(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (PredictionError, ckpt.CheckpointError, dev.DeviceError, data.DataError, export.ExportError,
            ckpt.SaveError, cam.CamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
