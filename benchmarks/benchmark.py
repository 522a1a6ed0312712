"""Side-by-side speed of this project's defaults against the classic (seed-style) setup.

    python benchmarks/benchmark.py ../shared/flower_photos

DATA is a folder of class folders (or a split with train/). Each measurement runs in a fresh
process, alternating the two configurations, so both see the same machine state; each prints
images per second and the process's peak memory (RSS of the main process: loader
workers are forks that share its pages).

seed-style training: torchvision ImageFolder, ToTensor + Normalize in 2 loader workers, fp32
NCHW, Adam, batch 32. Project training: train.py's own pieces (decoded-image cache, uint8
batches normalised once per batch, channels_last, fused Adam, the allocator setting, its
default loader workers). Prediction: the seed's one image at a time against predict.py's batches.
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
import options  # noqa: E402
BATCH = 32
# The first step picks oneDNN's kernels and the second still grows the heap (page faults); from the
# third on, a step takes as long as it does in the middle of a long run, for both configurations.
WARMUP_STEPS = 2


def make_subset(root, count, dest):
    """Link the first `count` images of a class-interleaved order into dest/<class>/: every run
    reads the same files, and a big folder costs no time."""
    import data

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
    import data

    classes = data.find_classes(root)
    return classes, data.list_images(root, classes)


def train_seed_style(root, batch_size, steps):
    import torch
    from torchvision import datasets, transforms

    from model import GoogLeNet

    classes, _ = subset(root)
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    ds = datasets.ImageFolder(root, transform=tf)
    workers = min(os.cpu_count(), batch_size, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
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


def train_project(root, batch_size, steps, micro_batch):
    import torch

    import data
    import device as dev
    import train
    from model import GoogLeNet

    cpu = torch.device("cpu")
    dev.tune_backends(cpu)
    classes, _ = subset(root)
    start = time.perf_counter()
    ds = data.FlowerFolder(root, data.build_transforms(train=True), classes, cache=True)
    cache_seconds = time.perf_counter() - start
    sampler = data.EpochSampler(len(ds), shuffle=True)
    loader = data.make_loader(ds, sampler, batch_size, data.default_workers(batch_size, cpu, True), cpu)
    model = GoogLeNet(num_classes=len(classes), aux_logits=True, init_weights=True)
    model = model.to(memory_format=torch.channels_last)
    args = train.get_args_parser().parse_args(["--micro-batch", str(micro_batch)])
    optimizer = train.build_optimizer(args, model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    micro = micro_batch if 0 < micro_batch < batch_size else batch_size

    def step(x, y):
        x = data.normalize_batch(x, channels_last=True)
        optimizer.zero_grad(set_to_none=True)
        for xs, ys in zip(x.split(micro), y.split(micro)):
            logits, aux2, aux1 = model(xs)
            loss = loss_fn(logits, ys) + 0.3 * (loss_fn(aux1, ys) + loss_fn(aux2, ys))
            (loss * (len(xs) / len(x))).backward()
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


def predict_seed_style(root):
    import torch
    from PIL import Image
    from torchvision import transforms

    from model import GoogLeNet

    classes, chosen = subset(root)
    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                             transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, init_weights=True).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for path, _ in chosen:
            x = tf(Image.open(path).convert("RGB")).unsqueeze(0)
            torch.softmax(model(x).squeeze(0), dim=0)
    return {"images_per_s": len(chosen) / (time.perf_counter() - start)}


def predict_project(root):
    import torch

    import device as dev
    import predict
    from model import GoogLeNet

    cpu = torch.device("cpu")
    dev.tune_backends(cpu)
    classes, chosen = subset(root)
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, init_weights=True)
    model = model.to(memory_format=torch.channels_last).eval()
    files = [p for p, _ in chosen]
    args = predict.get_args_parser().parse_args(files[:1])
    workers = predict.default_workers(len(files), cpu)
    preprocessing = ((0.5,) * 3, (0.5,) * 3, 224)
    start = time.perf_counter()
    probabilities, _ = predict.predict(model, files, preprocessing, cpu, args.batch_size, workers)
    assert probabilities.shape == (len(files), len(classes))
    return {"images_per_s": len(files) / (time.perf_counter() - start)}


def measure(kind, folder, opts):
    """Run one measurement in a fresh Python process and return its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), folder, "--run", kind,
           "--train-steps", str(opts.train_steps), "--predict-images", str(opts.predict_images),
           "--micro-batch", str(opts.micro_batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"error: the {kind} measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="folder of class folders (or of train/<class>/), e.g. ../shared/flower_photos")
    p.add_argument("--rounds", type=options.positive_int, default=2, help="alternations of the two configurations")
    p.add_argument("--train-steps", type=options.positive_int, default=6, help="timed training steps of batch 32 per run")
    p.add_argument("--predict-images", type=options.positive_int, default=256, help="images classified per prediction run")
    p.add_argument("--micro-batch", type=options.non_negative_int, default=0, help="the project's --micro-batch for training")
    p.add_argument("--skip", choices=["train", "predict"], default=None, help="leave out one half")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    return p


def main():
    opts = get_args_parser().parse_args()
    root = os.path.join(opts.data, "train") if os.path.isdir(os.path.join(opts.data, "train")) else opts.data
    if not os.path.isdir(root):
        sys.exit(f"error: data folder {opts.data} does not exist: pass a folder of class folders")
    opts.data = root

    if opts.run:
        import torch

        from train import peak_rss_gib

        runs = {"train-seed": lambda: train_seed_style(root, BATCH, opts.train_steps),
                "train-project": lambda: train_project(root, BATCH, opts.train_steps, opts.micro_batch),
                "predict-seed": lambda: predict_seed_style(root),
                "predict-project": lambda: predict_project(root)}
        result = runs[opts.run]()
        result.update(peak_rss_mib=round(peak_rss_gib() * 1024), threads=torch.get_num_threads())
        print(json.dumps(result))
        return

    import platform

    print(f"data {root}; {os.cpu_count()} CPUs; {platform.processor() or platform.machine()}; "
          f"python {platform.python_version()}")
    parts = [x for x in ("train", "predict") if x != opts.skip]
    results = {f"{part}-{cfg}": [] for part in parts for cfg in ("seed", "project")}
    tmp = tempfile.mkdtemp(prefix="googlenet-bench-")
    # training draws (warm-up + timed steps) batches per run; 2 more keep the last batch of an epoch full
    train_images = BATCH * (WARMUP_STEPS + opts.train_steps + 2)
    folders = {"train": make_subset(root, train_images, os.path.join(tmp, "train")),
               "predict": make_subset(root, opts.predict_images, os.path.join(tmp, "predict"))}
    for r in range(opts.rounds):
        for part in parts:
            for cfg in ("seed", "project"):
                res = measure(f"{part}-{cfg}", folders[part], opts)
                results[f"{part}-{cfg}"].append(res)
                print(f"round {r + 1}: {part:<7} {cfg:<7} {res['images_per_s']:6.2f} img/s  "
                      f"peak RSS {res['peak_rss_mib']} MiB", flush=True)
    print(f"\n{'':8}{'seed-style img/s':>18}{'project img/s':>16}{'ratio':>8}{'peak RSS seed/project MiB':>28}")
    for part in parts:
        seed = statistics.median(x["images_per_s"] for x in results[f"{part}-seed"])
        proj = statistics.median(x["images_per_s"] for x in results[f"{part}-project"])
        rss = (max(x["peak_rss_mib"] for x in results[f"{part}-seed"]),
               max(x["peak_rss_mib"] for x in results[f"{part}-project"]))
        print(f"{part:<8}{seed:>18.2f}{proj:>16.2f}{proj / seed:>7.2f}x{rss[0]:>14} / {rss[1]}")
    print("(medians over rounds)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
