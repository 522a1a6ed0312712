"""Start-up and memory of train.py on large folders, made of hard links to a folder of photos.

    python benchmarks/startup.py --source data_set/flower_data/flower_photos --photos 3000 30000 300000
    python benchmarks/startup.py --source data_set/flower_data/flower_photos --photos 15000 --processes 2 --epochs 1

For each count, a folder of class folders with that many photos is made under --work (hard links
to --source's photos, cycled: no extra disk), then train.py runs on it and this reports the seconds
from launch to its `data:` line and to the end of its first training step, and the peak memory of
all its processes together (the sum of their proportional set sizes, PSS, sampled every 0.2 s:
pages that processes share, such as the image cache, are counted once). Without --epochs the run
is stopped after its first step; with it, it runs those epochs (the cache is full after the first).
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmark import cpu_description  # noqa: E402
from plumbing import options  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="a folder of class folders of photos to link to")
    p.add_argument("--photos", type=options.positive_int, nargs="+", default=[3000, 30000], help="folder sizes to time")
    p.add_argument("--work", default="/tmp/googlenet-startup", help="where the linked folders are made")
    p.add_argument("--cache", nargs="+", default=["off", "auto"], choices=["off", "auto", "on"],
                   help="--cache modes to time")
    p.add_argument("--processes", type=options.positive_int, default=1,
                   help="train.py processes (torchrun when more than 1)")
    p.add_argument("--epochs", type=options.positive_int, default=None,
                   help="run this many epochs instead of stopping after the first step")
    p.add_argument("--image-size", type=options.image_size, default=128, help="train.py's --image-size")
    return p


def linked_folder(source, count, work):
    """work/<count>/<class>/<n>_<name>: count hard links to source's photos, classes kept, cycled."""
    from training import data

    folder = os.path.join(work, str(count))
    if os.path.isdir(folder):
        return folder
    classes = data.find_classes(source)
    samples = data.list_images(source, classes)
    tmp = folder + ".part"
    for i in range(count):
        path, k = samples[i % len(samples)]
        target = os.path.join(tmp, classes[k], f"{i:07d}_{os.path.basename(path)}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(path, target)
    os.rename(tmp, folder)
    return folder


def tree_pss_kib(root_pid):
    """The summed PSS of a process and all its descendants (0 for those that just ended)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def time_startup(folder, cache, opts):
    out = os.path.join(opts.work, f"out-{os.path.basename(folder)}-{cache}-{opts.processes}")
    train_args = ["--data-path", folder, "--output-dir", out, "--class-indices", os.path.join(out, "ci.json"),
                  "--cache", cache, "--image-size", str(opts.image_size), "--overwrite",
                  "--epochs", str(opts.epochs or 1)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opts.processes}"]
                if opts.processes > 1 else [sys.executable])
    start = time.perf_counter()
    proc = subprocess.Popen([*launcher, os.path.join(ROOT, "train.py"), *train_args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    os.set_blocking(proc.stdout.fileno(), False)
    text, data_s, step_s, peak = "", None, None, 0
    while proc.poll() is None:
        chunk = proc.stdout.read() or b""
        text += chunk.decode(errors="replace")
        now = time.perf_counter() - start
        if data_s is None and "\ndata: " in "\n" + text:
            data_s = now
        if step_s is None and re.search(r"train 1/\S+ \(\d+ px\):\s+\d+%\|[^|]*\| [1-9]", text):
            step_s = now
            if not opts.epochs:
                proc.send_signal(signal.SIGTERM)
        peak = max(peak, tree_pss_kib(proc.pid))
        time.sleep(0.2)
    text += (proc.stdout.read() or b"").decode(errors="replace")
    if data_s is None:
        sys.exit(f"error: train.py ended before its data line:\n{text[-2000:]}")
    cached = re.search(r"cache: ([^\n]*)", text)
    return data_s, step_s, peak / 2 ** 20, cached.group(1)[:60] if cached else ""


def main(argv=None):
    opts = get_args_parser().parse_args(argv)
    print(f"{cpu_description()}; {opts.processes} process(es); --image-size {opts.image_size}"
          + (f"; {opts.epochs} epoch(s)" if opts.epochs else "; stopped after the first step"))
    print("| photos | --cache | to the data line (s) | to the first step (s) "
          "| peak memory, all processes (GiB) | cache line |")
    print("| --- | --- | --- | --- | --- | --- |")
    for count in opts.photos:
        folder = linked_folder(opts.source, count, opts.work)
        for cache in opts.cache:
            data_s, step_s, peak, cached = time_startup(folder, cache, opts)
            step = f"{step_s:.1f}" if step_s is not None else "-"
            print(f"| {count:,} | {cache} | {data_s:.1f} | {step} | {peak:.2f} | {cached} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
