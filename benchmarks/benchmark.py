"""Side-by-side speed: the classic (seed-style) setup, this project in fp32 and in bf16, and ONNX Runtime.

    python benchmarks/benchmark.py ../shared/flower_photos

DATA is a folder of class folders (or a split with train/). Each measurement runs in a fresh
process, the configurations alternating round by round, so all see the same machine state; each
reports images per second and the process's peak memory (RSS of the main process: loader workers
are forks that share its pages). The CPU's name and its vector and bf16 flags are printed first.

Training (batch 32, the data loading included):
  seed-style    torchvision ImageFolder, ToTensor + Normalize in loader workers, fp32 NCHW, Adam;
  fp32, bf16    train.py's own pieces (decoded-image cache, uint8 batches normalised once per batch,
                channels_last, fused Adam, the allocator setting, its loader workers), with
                train.py's --amp off and --amp bf16.
Prediction (decoding included):
  seed-style    one image at a time; fp32, bf16: predict.py's batches with --amp off / bf16;
  onnx          predict.py's batches through ONNX Runtime, the same model exported by export.py.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from inference import classify  # noqa: E402
from plumbing import options  # noqa: E402

BATCH = 32
# The first step picks oneDNN's kernels and the second still grows the heap (page faults); from the
# third on, a step takes as long as it does in the middle of a long run, for every configuration.
WARMUP_STEPS = 2
CONFIGS = {"train": ("seed", "fp32", "bf16"), "predict": ("seed", "fp32", "bf16", "onnx")}


def make_subset(root, count, dest):
    """Link the first `count` images of a class-interleaved order into dest/<class>/: every run
    reads the same files, and a big folder costs no time."""
    from training import data

    classes = data.find_classes(root)
    per_class = [[p for p, k in data.list_images(root, classes) if k == c] for c in range(len(classes))]
    chosen = 0
    while chosen < count and any(per_class):
        for name, items in zip(classes, per_class):
            if items and chosen < count:
                path = items.pop(0)
                os.makedirs(os.path.join(dest, name), exist_ok=True)
                os.symlink(os.path.abspath(path), os.path.join(dest, name, f"{chosen:05d}_{os.path.basename(path)}"))
                chosen += 1
    return dest


def subset(root):
    from training import data

    classes = data.find_classes(root)
    return classes, data.list_images(root, classes)


def train_seed_style(root, size, steps):
    import torch
    from torchvision import datasets, transforms

    from model import GoogLeNet

    classes, _ = subset(root)
    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = datasets.ImageFolder(root, transform=tf)
    workers = min(os.cpu_count(), BATCH, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers)
    model = GoogLeNet(num_classes=len(classes), aux_logits=True, init_weights=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        optimizer.zero_grad()
        logits, aux2, aux1 = model(x)
        loss = loss_fn(logits, y) + 0.3 * loss_fn(aux1, y) + 0.3 * loss_fn(aux2, y)
        loss.backward()
        optimizer.step()

    return timed_epochs(loader, step, steps)


def train_project(root, size, steps, amp):
    import torch

    import train
    from inference import images
    from model import GoogLeNet
    from plumbing import device as dev
    from training import data, recipe

    placement = dev.place("cpu", amp)
    cpu, amp_dtype = placement.device, placement.amp_dtype
    classes, samples = subset(root)
    start = time.perf_counter()
    ds = data.ImageDataset(samples, data.train_transform(size), cache=True)
    cache_seconds = time.perf_counter() - start
    sampler = data.EpochSampler(len(ds), shuffle=True)
    loader = data.make_loader(ds, sampler, BATCH, images.default_workers("cpu", BATCH, cached=True), cpu)
    model = GoogLeNet(num_classes=len(classes), aux_logits=True, init_weights=True)
    model = model.to(memory_format=torch.channels_last)
    optimizer = recipe.build_optimizer(train.get_args_parser().parse_args([]), model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):  # what train_one_epoch does for one batch
        x = data.normalize_batch(x, channels_last=True)
        optimizer.zero_grad(set_to_none=True)
        with dev.autocast(cpu, amp_dtype):
            outputs = model(x)
        logits, aux2, aux1 = (o.float() for o in outputs)
        loss = loss_fn(logits, y) + 0.3 * (loss_fn(aux1, y) + loss_fn(aux2, y))
        loss.backward()
        optimizer.step()

    result = timed_epochs(loader, step, steps, sampler)
    result["cache_fill_s"] = round(cache_seconds, 1)
    return result


def timed_epochs(loader, step, steps, sampler=None):
    """WARMUP_STEPS untimed steps, then `steps` timed steps including the data loading, across epochs."""
    done, timed_images, start, epoch = 0, 0, None, 0
    while done < WARMUP_STEPS + steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            step(x, y)
            done += 1
            if done == WARMUP_STEPS:
                start = time.perf_counter()
            elif done > WARMUP_STEPS:
                timed_images += len(x)
            if done == WARMUP_STEPS + steps:
                break
        epoch += 1
    return {"images_per_s": timed_images / (time.perf_counter() - start)}


def predict_seed_style(root, size):
    import torch
    from PIL import Image
    from torchvision import transforms

    from model import GoogLeNet

    classes, chosen = subset(root)
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, init_weights=True).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for path, _ in chosen:
            x = tf(Image.open(path).convert("RGB")).unsqueeze(0)
            torch.softmax(model(x).squeeze(0), dim=0)
    return {"images_per_s": len(chosen) / (time.perf_counter() - start)}


def predict_project(root, size, config, onnx_file):
    import torch

    import predict
    from inference import images
    from model import GoogLeNet
    from plumbing import device as dev

    classes, chosen = subset(root)
    files = [p for p, _ in chosen]
    if config == "onnx":
        classifier = classify.load_classifier(onnx_file)
    else:
        placement = dev.place("cpu", "off" if config == "fp32" else "bf16")
        model = GoogLeNet(num_classes=len(classes), aux_logits=False, init_weights=True)
        model = model.to(memory_format=torch.channels_last).eval()
        classifier = classify.Classifier(classify.TorchLogits(model, placement), classes,
                                         images.Preprocessing(size, size))
    args = predict.get_args_parser().parse_args(files[:1])
    workers = images.default_workers("cpu", args.batch_size, items=len(files))
    start = time.perf_counter()
    probabilities, _ = classify.predict(classifier, files, args.batch_size, workers)
    assert probabilities.shape == (len(files), len(classes))
    return {"images_per_s": len(files) / (time.perf_counter() - start)}


def export_for_benchmark(root, size, dest):
    """A randomly initialised model of the benchmark's class count, exported as predict.py's .onnx input."""
    import torch

    import export
    from inference import images
    from model import GoogLeNet

    classes, _ = subset(root)
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, init_weights=True).eval()
    path = os.path.join(dest, "benchmark.onnx")
    export.export(model, classes, images.Preprocessing(size, size), "paper", path, log=lambda *a: None)
    return path


def cpu_description():
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    capabilities = torch.cpu.get_capabilities()
    flags = [f for f in ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_bf16") if capabilities.get(f)]
    return f"{name}; {os.cpu_count()} CPUs; flags {' '.join(flags) or 'none of avx2/avx512'}; " \
           f"torch {torch.__version__}; python {platform.python_version()}"


def measure(kind, folder, opts, onnx_file):
    """Run one measurement in a fresh Python process and return its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), folder, "--run", kind, "--train-steps", str(opts.train_steps),
           "--predict-images", str(opts.predict_images), "--image-size", str(opts.image_size),
           "--onnx-file", onnx_file or ""]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"error: the {kind} measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="folder of class folders (or of train/<class>/), e.g. ../shared/flower_photos")
    p.add_argument("--rounds", type=options.positive_int, default=2, help="alternations of the configurations")
    p.add_argument("--train-steps", type=options.positive_int, default=6,
                   help="timed training steps of batch 32 per run")
    p.add_argument("--predict-images", type=options.positive_int, default=256,
                   help="images classified per prediction run")
    p.add_argument("--image-size", type=options.image_size, default=224, help="training crop and prediction size")
    p.add_argument("--skip", nargs="+", default=[], metavar="PART_OR_CONFIG",
                   choices=["train", "predict", "seed", "fp32", "bf16", "onnx"],
                   help="leave out a half (train, predict) or configurations (seed, fp32, bf16, onnx)")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--onnx-file", default=None, help=argparse.SUPPRESS)  # internal
    return p


def main():
    opts = get_args_parser().parse_args()
    root = os.path.join(opts.data, "train") if os.path.isdir(os.path.join(opts.data, "train")) else opts.data
    if not os.path.isdir(root):
        sys.exit(f"error: data folder {opts.data} does not exist: pass a folder of class folders")

    if opts.run:
        import torch

        from plumbing.device import peak_rss_gib

        part, config = opts.run.split("-")
        if part == "train":
            result = (train_seed_style(root, opts.image_size, opts.train_steps) if config == "seed" else
                      train_project(root, opts.image_size, opts.train_steps, "off" if config == "fp32" else "bf16"))
        else:
            result = (predict_seed_style(root, opts.image_size) if config == "seed" else
                      predict_project(root, opts.image_size, config, opts.onnx_file))
        result.update(peak_rss_mib=round(peak_rss_gib() * 1024), threads=torch.get_num_threads())
        print(json.dumps(result))
        return

    import export

    print(f"data {root}; {opts.image_size} px; {cpu_description()}")
    runs = [(part, config) for part, configs in CONFIGS.items() if part not in opts.skip
            for config in configs if config not in opts.skip]
    tmp = tempfile.mkdtemp(prefix="googlenet-bench-")
    try:
        onnx_file = None
        if ("predict", "onnx") in runs:
            try:
                export.require_onnx()
                onnx_file = export_for_benchmark(root, opts.image_size, tmp)
            except export.ExportError as e:
                print(f"leaving out onnx: {e}")
                runs.remove(("predict", "onnx"))
        results = {run: [] for run in runs}
        # training draws (warm-up + timed steps) batches per run; 2 more keep the last batch of an epoch full
        train_images = BATCH * (WARMUP_STEPS + opts.train_steps + 2)
        folders = {"train": make_subset(root, train_images, os.path.join(tmp, "train")),
                   "predict": make_subset(root, opts.predict_images, os.path.join(tmp, "predict"))}
        for r in range(opts.rounds):
            for part, config in runs:
                res = measure(f"{part}-{config}", folders[part], opts, onnx_file)
                results[(part, config)].append(res)
                print(f"round {r + 1}: {part:<7} {config:<5} {res['images_per_s']:7.2f} img/s  "
                      f"peak RSS {res['peak_rss_mib']} MiB", flush=True)
    finally:
        shutil.rmtree(tmp)

    median = {run: statistics.median(x["images_per_s"] for x in rs) for run, rs in results.items()}
    print("\nmedians over rounds, img/s (peak RSS MiB)")
    for part in CONFIGS:
        done = [c for c in CONFIGS[part] if (part, c) in median]
        if not done:
            continue
        cells = [f"{c} {median[(part, c)]:.2f} ({max(x['peak_rss_mib'] for x in results[(part, c)])})" for c in done]
        print(f"{part:<8} " + " | ".join(cells))
        ratios = [f"{a}/{b} {median[(part, a)] / median[(part, b)]:.2f}x"
                  for a, b in (("fp32", "seed"), ("bf16", "fp32"), ("onnx", "fp32"))
                  if (part, a) in median and (part, b) in median]
        print(f"{'':<8} " + "  ".join(ratios))


if __name__ == "__main__":
    main()
