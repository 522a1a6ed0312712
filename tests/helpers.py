"""Shared helpers for the tests: tiny image trees, bad files, running the commands (in this process
or as a new one), and the one small trained run that many test files use (conftest.py's small_run).

Everything here is offline and CPU only. Images are small (64 x 48); the model sees them at the
test's --image-size (48 px for most runs), so keep runs tiny.
"""
import contextlib
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
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


TEXTURE_SIZE = (96, 72)


def texture(seed, size=TEXTURE_SIZE):
    """A photo-like image: smooth random colour blobs with a little grain; every seed a different picture
    (the perceptual hash's tests need photos, not flat colours)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    grain = rng.integers(-12, 13, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=int) + grain, 0, 255).astype(np.uint8))


def run_ranks(target, *args, ranks=2):
    """Run target(rank, port, *args, results) in `ranks` forked processes (torchrun's local ranks on
    one free port) and return what each put on the results queue, sorted; a hung child is killed."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # no re-import of torch; the children use tiny tensors
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, results)) for r in range(ranks)]
    for p in procs:
        p.start()
    try:
        return sorted(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


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

    from training import data, image_cache

    samples = samples_of(root)
    shared, _ = image_cache.machine_cache(len(samples), 2 ** 26 if cached else 0, max(workers, 1), torch.device("cpu"))
    return data.ImageDataset(samples, transform, shared, substitute=substitute)


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
    the last.pth written after step n - 1 to keep (the place to resume from): with --save-every 1,
    or without it where step n - 1 ended an epoch."""
    import shutil

    steps = {"n": 0}

    def check(self, device, diverged=False, unreadable=False):  # once in every step, before its --save-every save
        steps["n"] += 1
        if steps["n"] == n:
            shutil.copy(Path(out) / "last.pth", keep)
        return diverged, steps["n"] == n, unreadable

    return check


# The small run's options beyond train_argv: 48 px training crops, evaluation at 60 px (1.25 x 48)
# from images resized to 64 (so a test can tell the resize from the crop)
SMALL_RUN = ("--image-size", 48, "--val-resize", 64)


def train_small_run(root):
    """A 1-epoch fp32 run of the default recipe at 48 px on a generated tree of 3 classes (12 train, 6
    val images) under root: {"data", "out", "best", "last", "ci", "argv", "stdout", "root"}. Tests use
    it through conftest.py's session fixture small_run and never change its files."""
    import train

    tree = make_tree(root / "data", n_train=4, n_val=2)
    argv = train_argv(tree, root / "out", *SMALL_RUN)
    code, stdout, err = call(train, argv)
    assert code == 0, err
    out = root / "out"
    return {"data": tree, "out": out, "best": out / "best.pth", "last": out / "last.pth", "ci": out / "ci.json",
            "argv": argv, "stdout": stdout, "root": root}


def eval_argv(weights, data, out, *extra):
    """train.py --eval-only arguments on the CPU in fp32, its files under out."""
    return [*FP32, "--eval-only", "--weights", weights, "--data-path", data, "--output-dir", out, "--device", "cpu",
            "--workers", 0, *extra]


def class_lines(out, classes=CLASSES):
    """predict.py's one-image output: [(class, probability)] in printed order."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in classes:
            rows.append((parts[0], float(parts[1])))
    return rows


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PageServer:
    """python app.py ARGS in its own process on a free port of 127.0.0.1, its output lines gathered
    in .output, from when the port takes connections until stop(). up_s: how long it may take to
    come up (its output fails the test then); stop_s: how long it has to end once terminated."""

    up_s, stop_s = 180, 30

    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), *map(str, args), "--port", str(self.port)],
                                     cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.output = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + self.up_s
        while True:
            assert self.proc.poll() is None, "".join(self.output)
            assert time.monotonic() < deadline, "the page never came up:\n" + "".join(self.output)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=self.stop_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def needs(*packages, why="requirements-dev.txt"):
    """A skip mark for tests of an optional feature: found without importing the packages, so that
    collecting the tests (python -m pytest -m quick) never pays for importing gradio or onnx."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} ({why})")


def fp16_on_the_cpu(monkeypatch):
    """--amp fp16, and --amp auto, take fp16 on the CPU for this test, as on a GPU without native bf16.
    Users are refused --amp fp16 on a CPU (a GPU's mode, slow there); the suite runs that path on the
    CPU, where torch's fp16 autocast and GradScaler("cpu") work as CUDA's do."""
    import torch

    from plumbing import device as dev

    chosen = dev.amp_dtype

    def amp_dtype(device, amp="auto", cpu_flags=None):
        if device.type == "cpu" and amp in ("auto", "fp16"):
            return torch.float16
        return chosen(device, amp, cpu_flags)

    monkeypatch.setattr(dev, "amp_dtype", amp_dtype)


class FakeCuda:
    """CUDA GPUs on a machine without one, for the tests of what picks and sets up a GPU.

    Only what the driver answers is faked: how many GPUs there are (torch._C._cuda_getDeviceCount, and
    NVML's count), the driver's initialisation (which makes one random number generator per GPU and the
    device properties: the compute capability), the current device (torch._C._cuda_setDevice,
    _cuda_getDevice, which refuse an ordinal the machine lacks as the driver does), and the probe that
    tries a bf16 tensor (pre-Ampere cards emulate bf16). Everything torch does before the driver stays
    torch's own: torch.cuda.set_device's argument rules (torch.cuda._utils._get_device_index),
    is_available, device_count, current_device, is_bf16_supported, get_rng_state and set_rng_state. A
    kernel or an allocation on the GPU still fails, as it would on this machine.

    Made with pytest's monkeypatch, which puts torch's state back when the test ends; conftest.py's
    fake_cuda fixture also puts back the backend flags that device.tune_backends sets for a GPU."""

    def __init__(self, monkeypatch, count=1, capability=(8, 0), emulates_bf16=True):
        import types

        import torch

        self.count, self.capability, self.current = count, capability, 0
        self.set_devices = []  # every index torch.cuda.set_device handed to the driver
        self._torch, self._namespace = torch, types.SimpleNamespace
        patch = monkeypatch.setattr
        patch(torch._C, "_cuda_getDeviceCount", lambda: self.count)
        patch(torch.cuda, "_device_count_nvml", lambda: self.count)
        patch(torch._C, "_cuda_init", self._init)
        patch(torch._C, "_cuda_setDevice", self._set_device)
        patch(torch._C, "_cuda_getDevice", self._get_device)
        patch(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates_bf16)
        # what the driver's initialisation sets, and torch's record of it: all put back afterwards
        patch(torch.cuda, "_get_device_properties", None, raising=False)
        patch(torch.cuda, "default_generators", ())
        patch(torch.cuda, "_initialized", False)
        patch(torch.cuda, "_queued_calls", [])
        patch(torch.cuda, "_cached_device_count", None)
        patch(torch.cuda, "_lazy_seed_tracker", torch.cuda._LazySeedTracker())

    def _init(self):
        torch = self._torch
        if self.count == 0:
            raise RuntimeError("No CUDA GPUs are available")
        torch.cuda.default_generators = tuple(torch.Generator() for _ in range(self.count))
        torch.cuda._get_device_properties = self._properties

    def _properties(self, index):
        major, minor = self.capability
        return self._namespace(name="fake GPU", major=major, minor=minor, total_memory=16 * 2 ** 30)

    def _check_ordinal(self, index):
        if not isinstance(index, int):  # the C++ binding takes an int and nothing else
            raise TypeError(f"invalid argument to setDevice: {index!r}")
        if not 0 <= index < self.count:
            raise self._torch.AcceleratorError("CUDA error: invalid device ordinal")

    def _set_device(self, index):
        self._torch.cuda._lazy_init()  # the binding initialises CUDA first, as the real one does
        self._check_ordinal(index)
        self.set_devices.append(index)
        self.current = index

    def _get_device(self):
        self._torch.cuda._lazy_init()
        return self.current
