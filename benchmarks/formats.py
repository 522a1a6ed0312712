"""One table that compares the deployment formats of a trained model, on this CPU.

    python benchmarks/formats.py --weights weights/best.pth --data-path DIR

DIR is the run's data (by default the --data-path its checkpoint records). The fp32 and INT8
.onnx files are exported into a temporary folder, INT8 calibrated on training photos as
export.py --int8 does. Each row is a format: PyTorch fp32, PyTorch bf16 autocast (only where the
CPU has native bf16), ONNX Runtime fp32 and INT8, and OpenVINO fp32, bf16 (where the CPU has native
bf16) and INT8 (the same two files, where openvino is installed). Columns: the file's size, accuracy on the run's
val photos, the share of val photos whose top class is PyTorch fp32's, compute-only images per
second at batch 32 (preprocessed images in memory, after 2 warm-up batches), and predict.py's
images per second end to end on the val photos (a new process: start-up, decoding and all).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmark import cpu_description  # noqa: E402
from inference import classify, images  # noqa: E402
from plumbing import options  # noqa: E402

WARMUP = 2


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=os.path.join("weights", "best.pth"), help="a checkpoint written by train.py")
    p.add_argument("--data-path", default=None, help="the run's data (default: the one its checkpoint records)")
    p.add_argument("--batches", type=options.positive_int, default=8, help="timed batches of 32 for the compute column")
    p.add_argument("--calibration-images", type=options.positive_int, default=300,
                   help="training photos that calibrate the INT8 file")
    return p


def compute_rate(logits_of, batch, batches):
    for _ in range(WARMUP):
        logits_of(batch)
    start = time.perf_counter()
    for _ in range(batches):
        logits_of(batch)
    return batches * len(batch) / (time.perf_counter() - start)


def predict_rate(files, weights, options):
    """predict.py on the files in a new process: images per second, process start included."""
    command = [sys.executable, os.path.join(ROOT, "predict.py"), *files, "--weights", weights, *options]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: some file was unreadable, the rest were classified
        sys.exit(f"error: predict.py failed: {proc.stderr.strip().splitlines()[-1]}")
    return len(files) / seconds


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    import torch

    import export
    from inference import checkpoint as ckpt
    from inference.runtimes import OnnxModel, OpenVinoModel
    from plumbing import device as dev

    try:
        export.require_onnx()
        model, classes, preprocessing = ckpt.load_model(args.weights, "class_indices.json", torch.device("cpu"))
        train_samples, val_samples, root = export.run_photos(ckpt.load_checkpoint(args.weights), args.data_path)
        quantization = export.quantization_photos(train_samples, args.calibration_images)
    except options.UserError as e:
        sys.exit(f"error: {e}")
    native = dev.cpu_bf16_flags()
    print(f"{cpu_description()}; native bf16: {'yes (' + ', '.join(native) + ')' if native else 'no'}")
    print(f"weights {args.weights}, data {root}: {len(val_samples)} val photos at {preprocessing.crop} px; "
          f"{torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory(prefix="googlenet-formats-") as folder:
        fp32_blob, _ = export.to_onnx(model, classes, preprocessing, model.variant, log=lambda *a: None)
        int8 = export.quantize(fp32_blob, classes, preprocessing, quantization, val_samples, log=lambda *a: None)
        files = {"onnx fp32": os.path.join(folder, "fp32.onnx"), "onnx int8": os.path.join(folder, "int8.onnx")}
        for name, blob in (("onnx fp32", fp32_blob), ("onnx int8", export.with_metadata(int8.blob, {}))):
            with open(files[name], "wb") as f:
                f.write(blob)

        val_files = [p for p, _ in val_samples]
        labels = np.array([k for _, k in val_samples])
        pixels = np.stack([classify.prepare(f, preprocessing)[0] for f in val_files])
        batch = images.normalize(pixels[np.arange(32) % len(pixels)], preprocessing)  # 32, repeating if fewer
        rows = []
        formats = [("pytorch fp32", "off"), ("pytorch bf16", "bf16")] if native else [("pytorch fp32", "off")]
        for name, amp in formats:
            classifier = classify.Classifier(classify.TorchLogits(model, dev.place("cpu", amp)), classes, preprocessing)
            rows.append((name, os.path.getsize(args.weights), classifier, args.weights, ["--amp", amp]))
        for name in ("onnx fp32", "onnx int8"):
            rows.append((name, os.path.getsize(files[name]), classify.Classifier(OnnxModel(files[name]), classes,
                                                                                preprocessing), files[name], []))
        try:
            import openvino  # noqa: F401
        except ImportError:
            print("openvino is not installed (pip install openvino): its rows are left out")
        else:
            # OpenVINO's own default computes in bf16 on a CPU with native bf16: the fp32 file gets a row
            # each way there, and the INT8 file runs as predict.py runs it by default (--amp auto)
            openvino_rows = [("openvino fp32", "onnx fp32", "off")] + (
                [("openvino bf16", "onnx fp32", "auto")] if native else []) + [("openvino int8", "onnx int8", "auto")]
            for name, file, amp in openvino_rows:
                classifier = classify.Classifier(OpenVinoModel(files[file], amp=amp), classes, preprocessing)
                rows.append((name, os.path.getsize(files[file]), classifier, files[file],
                             ["--runtime", "openvino", "--amp", amp]))
        reference = None
        print("\n| format | file MB | val accuracy | top-1 agreement with pytorch fp32 | compute img/s (batch 32) | "
              "predict.py img/s end to end |\n| --- | --- | --- | --- | --- | --- |")
        for name, size, classifier, path, predict_options in rows:
            top = np.concatenate([classifier.probabilities(pixels[i:i + 32]).argmax(1)
                                  for i in range(0, len(pixels), 32)])
            reference = top if reference is None else reference
            rate = compute_rate(classifier.logits_of, batch, args.batches)
            end_to_end = predict_rate(val_files, path, predict_options)
            print(f"| {name} | {size / 2 ** 20:.1f} | {np.mean(top == labels):.3f} | {np.mean(top == reference):.3f} | "
                  f"{rate:.1f} | {end_to_end:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
