"""The Python parts of benchmarks/gpu_check.sh, one subcommand each (run that script, not this file):

    compute     images/s of train.py's training step on a batch already on the device (no loading),
                and torch.cuda.max_memory_allocated: the figure a training run's images/s is set against
    app         start app.py, answer one request through gradio_client, print the answer, stop it
    tiny-data   a tiny folder of class folders, for --dry-run
    table       the check script's rows (a tab-separated file) as a table
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from page_load import free_port  # noqa: E402

from plumbing import options  # noqa: E402

COLUMNS = ("check", "result", "seconds", "img/s", "compute img/s", "GPU GiB")


def compute(opts):
    """train.py's step (its model, loss, optimizer, loss scaler and EMA, in its precision and memory
    format) on a fixed uint8 batch already on the device: images/s over opts.steps steps after
    opts.warmup, and the device's peak allocated memory."""
    import torch

    import train
    from model import GoogLeNet
    from plumbing import device as dev
    from training import data, recipe

    args = train.get_args_parser().parse_args(["--amp", opts.amp, "--device", opts.device, "--batch-size",
                                               str(opts.batch_size)]
                                              + (["--compile"] if opts.compile else [])
                                              + ([] if opts.channels_last else ["--no-channels-last"]))
    placement = dev.place(args.device, args.amp)
    device = placement.device
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=5, aux_logits=True, init_weights=True, variant=train.DEFAULT_VARIANT).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = train.compiled(model) if args.compile else model
    optimizer = recipe.build_optimizer(args, model.parameters())
    criterion = recipe.ClassWeightedLoss(None, args.label_smoothing)
    scaler, ema = dev.grad_scaler(device, placement.amp_dtype), recipe.build_ema(args, model)
    images = torch.randint(0, 256, (args.batch_size, 3, opts.image_size, opts.image_size), dtype=torch.uint8,
                           device=device)
    labels = torch.randint(0, 5, (args.batch_size,), device=device)

    def step():
        x = data.normalize_batch(images, channels_last=args.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with dev.autocast(device, placement.amp_dtype):
            logits, aux2, aux1 = (o.float() for o in forward(x))
        loss = criterion(logits, labels) + args.aux_weight * (criterion(aux1, labels) + criterion(aux2, labels))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        recipe.update_ema(ema, model, args.model_ema_decay)

    forward.train()
    for _ in range(opts.warmup):
        step()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(opts.steps):
        step()
    synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    print(json.dumps({"images_per_s": round(opts.steps * args.batch_size / seconds, 1),
                      "max_memory_gib": None if peak is None else round(peak, 2), "precision": placement.precision}))


def app(opts):
    """app.py on a free local port, asked once through gradio_client, as a visitor's browser does."""
    import gradio_client

    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--weights", opts.weights, "--port",
                               str(port), "--device", opts.device], cwd=ROOT)
    try:
        deadline = time.monotonic() + opts.timeout
        while True:
            if server.poll() is not None:
                sys.exit(f"error: app.py ended with exit code {server.returncode} before answering")
            if time.monotonic() > deadline:
                sys.exit(f"error: app.py did not answer on port {port} within {opts.timeout} s")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        label, _, note = client.predict(gradio_client.handle_file(opts.image), api_name="/classify")
        print(f"app.py answered: {label['label']} ({note.split('.')[0]})")
    finally:
        server.terminate()
        server.wait(timeout=30)


def tiny_data(opts):
    """3 classes of 6 photos, 64 x 48, each class its colour plus noise: enough for a 1-epoch CPU run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in (("daisy", (220, 40, 40)), ("roses", (40, 200, 60)), ("tulips", (50, 70, 230))):
        os.makedirs(os.path.join(opts.folder, name), exist_ok=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.integers(-25, 26, (48, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(opts.folder, name, f"{name}_{i:02d}.jpg"))


def print_rows(opts):
    """The rows (tab-separated: COLUMNS, then the command) as an aligned table, commands below."""
    with open(opts.rows) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    for row in [list(COLUMNS)] + [r[:len(COLUMNS)] for r in rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print()
    for r in rows:
        print(f"{r[0]}: {r[len(COLUMNS)]}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compute", help="images/s of the compute-only training step, and the peak GPU memory")
    c.add_argument("--device", default="auto")
    c.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    c.add_argument("--compile", action="store_true")
    c.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument("--batch-size", type=options.positive_int, default=32)
    c.add_argument("--image-size", type=options.image_size, default=128)
    c.add_argument("--warmup", type=options.positive_int, default=5)
    c.add_argument("--steps", type=options.positive_int, default=30)
    a = sub.add_parser("app", help="start app.py and answer one request")
    a.add_argument("--weights", required=True)
    a.add_argument("--image", required=True)
    a.add_argument("--device", default="auto")
    a.add_argument("--timeout", type=options.positive_int, default=180)
    t = sub.add_parser("tiny-data", help="a tiny folder of class folders")
    t.add_argument("folder")
    r = sub.add_parser("table", help="print the rows file as a table")
    r.add_argument("rows")
    return p


def main():
    opts = get_args_parser().parse_args()
    {"compute": compute, "app": app, "tiny-data": tiny_data, "table": print_rows}[opts.command](opts)


if __name__ == "__main__":
    main()
