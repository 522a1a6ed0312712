"""Shared helpers for the end-to-end tests: tiny image trees, bad files and running the scripts.

Everything here is offline and CPU only. Images are small (64 x 48); the model still sees them at
the recipe's 128 x 128 (or a test's --image-size), so keep runs tiny.
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "train.py")
PREDICT = str(REPO / "predict.py")

CLASSES = ("daisy", "roses", "tulips")
COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (160, 60, 200)]
SIZE = (64, 48)  # width, height


def pixels(color, seed, size=SIZE):
    """An H x W x 3 uint8 array: color plus a little noise, different for every seed."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-25, 26, (size[1], size[0], 3))
    return np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)


def save_image(path, color, seed=0, mode="RGB", size=SIZE):
    """Write one image in the given Pillow mode; the format follows the file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels(color, seed, size))
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(np.full((size[1], size[0]), 180, np.uint8)))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    with Image.open(path) as check:  # the file really has that mode (JPEG has no P or RGBA)
        assert check.mode == mode, (path, check.mode, mode)
    return path


def make_tree(root, classes=CLASSES, n_train=4, n_val=2, size=SIZE):
    """root/{train,val}/<class>/<class>_NN.jpg with class-dependent colors; returns root."""
    root = Path(root)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, name in enumerate(classes):
            for i in range(n):
                seed = k * 1000 + i + (500 if split == "val" else 0)
                save_image(root / split / name / f"{name}_{i:02d}.jpg", COLORS[k], seed, size=size)
    return root


def samples_of(root):
    """(path, class index) samples of a folder of class folders, as train.py lists them."""
    from training import data

    return data.list_images(str(root), data.find_classes(str(root)))


def dataset_of(root, transform, cached=True, substitute=True, workers=0):
    """data.ImageDataset of a folder of class folders with its own image cache (room for every
    image, or none with cached=False) for a loader with that many workers."""
    import torch

    from training import data

    samples = samples_of(root)
    images_cache, _ = data.machine_cache(len(samples), 2 ** 26 if cached else 0, max(workers, 1), torch.device("cpu"))
    return data.ImageDataset(samples, transform, images_cache, substitute=substitute)


def write_corrupt(path, n=2000, seed=1):
    """Random bytes under an image name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def write_truncated_jpeg(path, color=(120, 120, 120), seed=7, size=(256, 192)):
    """The first half of a valid JPEG: the header parses, the pixel data ends early."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(pixels(color, seed, size)).save(buf, format="JPEG", quality=95)
    whole = buf.getvalue()
    path.write_bytes(whole[: len(whole) // 2])
    return path


# The precision every test states: what --amp auto picks depends on the CPU (bf16 where it has native
# bf16, fp32 elsewhere), so a test that leaves it to auto would compute different numbers on
# different machines. Tests run fp32 unless they are about bf16 or about the auto decision itself.
FP32 = ["--amp", "off"]


def train_argv(data, out, *extra, epochs=1, batch_size=4, amp="off"):
    """train.py arguments for a tiny CPU run whose files all go under out (never the repo), in fp32
    unless amp says otherwise (None leaves --amp out: pass it in extra; epochs=None leaves --epochs out)."""
    out = Path(out)
    return ["--data-path", str(data), "--output-dir", str(out), "--class-indices", str(out / "ci.json"),
            *(["--epochs", str(epochs)] if epochs else []), "--batch-size", str(batch_size), "--workers", "0",
            "--device", "cpu", *(["--amp", amp] if amp else []), *map(str, extra)]


def script_env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


SPLIT_DATA = ["-m", "data_set.split_data"]  # run from the repository's folder, as README shows


def run_script(script, args=(), cwd=REPO, timeout=600, env=None, **popen):
    """Run one of the repository's scripts in a new process with this interpreter: script is a path
    or ["-m", module]. Returns the CompletedProcess, with text output."""
    command = [sys.executable, *(script if isinstance(script, list) else [str(script)]), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env or script_env(), capture_output=True, text=True,
                          timeout=timeout, **popen)


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_clean_error(code, stderr, *fragments):
    """A non-zero exit, a last stderr line starting with 'error:' naming the fragments, no traceback."""
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    line = last_line(stderr)
    assert line.startswith("error:"), stderr
    for fragment in fragments:
        assert str(fragment) in line, (fragment, line)
    return line


def call(module, argv):
    """module.run(argv) in this process (train, predict, export: no seconds spent importing torch
    again): (exit code, stdout, stderr). The signal handlers train.py installs are put back, so a
    module-scoped fixture can call it too."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module.run([str(a) for a in argv])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code, out.getvalue(), err.getvalue()


def load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def stop_after_step(n, out, keep):
    """A StopRequest.check for monkeypatching: it asks train.py to stop after step n, having copied
    the last.pth that --save-every 1 wrote after step n - 1 to keep (the place to resume from)."""
    import shutil

    steps = {"n": 0}

    def check(self, device, diverged=False, unreadable=False):  # once in every step, before its --save-every save
        steps["n"] += 1
        if steps["n"] == n:
            shutil.copy(Path(out) / "last.pth", keep)
        return diverged, steps["n"] == n, unreadable

    return check


def train_small_run(root):
    """A 1-epoch fp32 run at 64 px on a generated tree of 3 classes under root: {"data", "best", "root"}."""
    import train

    tree = make_tree(root / "data", n_train=4, n_val=2)
    assert call(train, train_argv(tree, root / "out", "--image-size", 64))[0] == 0
    return {"data": tree, "best": root / "out" / "best.pth", "root": root}
