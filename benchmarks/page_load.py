"""The demo page under load: many clients at once for a fixed time, sending good photos, files that are
no photo and uploads over the page's limit; then what the page left behind.

    python benchmarks/page_load.py --weights weights/best.pth
    python benchmarks/page_load.py --weights weights/best.pth --photos photos/ --clients 20 --seconds 60

It starts `python app.py` on a free port of 127.0.0.1 (with this environment's temporary folder, as
a deployed page would have), warms it up, then runs --clients threads for --seconds, each with its
own gradio_client session, in turn sending a good photo (the answer's heat map is fetched, as a
browser does), a file that is no photo (a text file named .jpg, a truncated JPEG, random bytes) and
an upload 1 MB over the limit, posted to Gradio's upload route as a client that ignores the page's
limit would. Every loop is bounded (the deadline, a cap on requests, a timeout on each request).

It prints: the requests sent, answered, refused (and how), failed (anything else: a good photo not
answered, a refusal with the wrong message or a server path in it, a timeout); the latencies; the
server process's RSS sampled every second over the load; what the page's temporary folder held at
most; the server log's lines ('refused ...' lines and tracebacks); and after the page is stopped
with SIGTERM, whether its folder and /tmp/gradio hold anything of it. The CPU first.
"""
import argparse
import collections
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmark import cpu_description  # noqa: E402
from plumbing import options  # noqa: E402

# the kinds each client sends, in turn (each client starts at another place in the cycle)
MIX = ("good", "no photo", "good", "over the limit", "good", "no photo")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="the page's --weights")
    p.add_argument("--photos", default=None, metavar="DIR",
                   help="a folder of photos to send (default: four generated 640 x 480 JPEGs)")
    p.add_argument("--clients", type=options.positive_int, default=20, help="clients sending at once")
    p.add_argument("--seconds", type=options.positive_float, default=60, help="how long they send")
    p.add_argument("--max-upload-mb", type=options.positive_int, default=2,
                   help="the page's --max-upload-mb (the oversized uploads are 1 MB more)")
    p.add_argument("--max-requests", type=options.positive_int, default=2000, help="the most one client sends")
    p.add_argument("--device", default="cpu", help="the page's --device")
    p.add_argument("--amp", default="off", help="the page's --amp")
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_files(work, photos_dir, over_bytes):
    """{kind: [paths]} of what the clients send."""
    from PIL import Image

    from inference import images

    rng = np.random.default_rng(0)
    if photos_dir:
        good = images.find_image_files(photos_dir)
    else:
        good = []
        for i, color in enumerate([(200, 40, 40), (40, 180, 60), (50, 70, 220), (220, 200, 40)]):
            noise = rng.integers(-40, 41, (480, 640, 3))
            path = os.path.join(work, f"photo_{i}.jpg")
            Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
            good.append(path)
    notes = os.path.join(work, "notes.jpg")
    with open(notes, "w") as f:
        f.write("a shopping list, not a photo\n")
    with open(good[0], "rb") as f:
        whole = f.read()
    half = os.path.join(work, "half.jpg")
    with open(half, "wb") as f:
        f.write(whole[: len(whole) // 2])
    noise = os.path.join(work, "noise.png")
    with open(noise, "wb") as f:
        f.write(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    huge = os.path.join(work, "huge.jpg")
    with open(huge, "wb") as f:
        f.write(rng.integers(0, 256, over_bytes, dtype=np.uint8).tobytes())
    return {"good": good, "no photo": [notes, half, noise], "over the limit": [huge]}


class PageProcess:
    """python app.py ... in its own process; its output lines, its RSS."""

    def __init__(self, argv):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        command = [sys.executable, os.path.join(ROOT, "app.py"), *argv, "--port", str(self.port)]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.output = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                sys.exit("the page did not come up:\n" + "".join(self.output))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        found = re.search(r"kept in (\S+) until answered", "".join(self.output))
        self.folder = found.group(1) if found else None

    def rss_mib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            return float("nan")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return "killed after 60 s"


def folder_usage(folder):
    """(files, bytes) under folder."""
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def tree(folder):
    """{relative path: size} of every file under folder (empty when it does not exist)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                found[os.path.relpath(path, folder)] = os.lstat(path).st_size
            except OSError:
                pass
    return found


def send(client, page, kind, path, timeout):
    """'answered' or 'refused', or raises AssertionError with what went wrong."""
    import gradio_client
    import httpx

    if kind == "over the limit":
        with open(path, "rb") as f:
            reply = httpx.post(page.url + "gradio_api/upload", files={"files": (os.path.basename(path), f)},
                               timeout=timeout)
        assert reply.status_code == 413, f"{reply.status_code} {reply.text[:200]}"
        return "refused"
    job = client.submit(gradio_client.handle_file(path), api_name="/classify")
    try:
        label = job.result(timeout=timeout)[0]
    except gradio_client.exceptions.AppError as e:
        assert kind == "no photo", f"a good photo refused: {e}"
        assert "cannot be read as an image" in str(e) and "/" not in str(e), f"a wrong message: {e}"
        return "refused"
    assert kind == "good", f"{os.path.basename(path)} answered: {label}"
    assert label.get("label"), label
    return "answered"


def load(page, files, args, downloads):
    """Runs the clients; returns (counts {(kind, outcome): n}, latencies {kind: [s]}, failures [str])."""
    import gradio_client

    counts, latencies, failures = {}, {kind: [] for kind in files}, []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client_loop(i):
        client = gradio_client.Client(page.url, verbose=False, download_files=os.path.join(downloads, str(i)))
        kinds = itertools.islice(itertools.cycle(MIX), i % len(MIX), None)
        for n, kind in zip(range(args.max_requests), kinds, strict=False):  # kinds never ends
            if time.monotonic() >= deadline:
                break
            path = files[kind][(i + n) % len(files[kind])]
            start = time.monotonic()
            try:
                outcome = send(client, page, kind, path, timeout=max(30.0, args.seconds))
            except Exception as e:  # anything but the expected answer or refusal
                outcome = "failed"
                with lock:
                    failures.append(f"{kind} {os.path.basename(path)}: {type(e).__name__}: {e}")
            with lock:
                counts[kind, outcome] = counts.get((kind, outcome), 0) + 1
                latencies[kind].append(time.monotonic() - start)
        client.close()

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=args.seconds + 120)
    if any(thread.is_alive() for thread in threads):
        failures.append("a client was still waiting 2 minutes after the deadline")
    return counts, latencies, failures


def sampler(page, stop, samples):
    """Every second until stop: (time, server RSS MiB, page folder files, bytes)."""
    start = time.monotonic()
    while not stop.wait(1.0):
        files, size = folder_usage(page.folder) if page.folder else (0, 0)
        samples.append((time.monotonic() - start, page.rss_mib(), files, size))


def main(args):
    import gradio_client

    print(f"CPU: {cpu_description()}")
    work = tempfile.mkdtemp(prefix="page-load-")
    system_tmp = tempfile.gettempdir()
    gradio_tmp = os.path.join(system_tmp, "gradio")
    gradio_before = tree(gradio_tmp)
    # this process's own temporary files (gradio_client's download folders) go with its work folder;
    # the page keeps this environment's, as a deployed page would
    tempfile.tempdir = work
    try:
        files = make_files(work, args.photos, (args.max_upload_mb + 1) * 2 ** 20)
        argv = ["--weights", args.weights, "--max-upload-mb", str(args.max_upload_mb),
                "--device", args.device, "--amp", args.amp]
        page = PageProcess(argv)
        print(f"page: python app.py {' '.join(argv)} on {page.url} (pid {page.proc.pid}), its folder {page.folder}")
        warm = gradio_client.Client(page.url, verbose=False, download_files=os.path.join(work, "warm"))
        for kind in MIX:  # every path runs once before the measured load
            for path in files[kind]:
                send(warm, page, kind, path, timeout=300)
        warm.close()
        print(f"load: {args.clients} clients for {args.seconds:.0f} s, each sending in turn {', '.join(MIX)} "
              f"({len(files['good'])} photos; no photo: {', '.join(map(os.path.basename, files['no photo']))}; "
              f"{args.max_upload_mb + 1} MB over a {args.max_upload_mb} MB limit)")
        logged = len(page.output)
        samples, stop = [], threading.Event()
        watcher = threading.Thread(target=sampler, args=(page, stop, samples), daemon=True)
        baseline = page.rss_mib()
        started = time.monotonic()
        watcher.start()
        counts, latencies, failures = load(page, files, args, os.path.join(work, "downloads"))
        elapsed = time.monotonic() - started
        stop.set()
        watcher.join()
        time.sleep(1)  # the server's last log lines
        log = page.output[logged:]

        sent = sum(counts.values())
        answered = sum(n for (_, outcome), n in counts.items() if outcome == "answered")
        refused = {kind: counts.get((kind, "refused"), 0) for kind in ("no photo", "over the limit")}
        print(f"requests: {sent} in {elapsed:.0f} s: {answered} answered ({answered / elapsed:.1f}/s), "
              f"{refused['no photo']} refused as no photo, {refused['over the limit']} refused over the limit "
              f"(HTTP 413), {len(failures)} failed")
        for failure in failures[:10]:
            print(f"  failed: {failure}")
        for kind, values in latencies.items():
            if values:
                median, p95 = statistics.median(values), float(np.percentile(values, 95))
                print(f"  latency {kind}: median {median:.2f} s, p95 {p95:.2f} s, max {max(values):.2f} s")
        rss = np.array([s[1] for s in samples])
        times = np.array([s[0] for s in samples])
        later = times >= times[-1] / 2
        slope = float(np.polyfit(times[later] / 60, rss[later], 1)[0]) if later.sum() > 2 else float("nan")
        marks = [int(k * (len(rss) - 1) / 4) for k in range(5)]
        print(f"server RSS MiB: {baseline:.0f} after the warm-up; during the load "
              + ", ".join(f"{rss[i]:.0f} at {times[i]:.0f} s" for i in marks)
              + f" (min {rss.min():.0f}, max {rss.max():.0f}; {len(samples)} samples; "
              f"trend over the second half {slope:+.1f} MiB/min)")
        print(f"page folder during the load: at most {max(s[2] for s in samples)} files, "
              f"{max(s[3] for s in samples) / 2 ** 20:.1f} MB")
        names = collections.Counter(os.path.basename(p) for p in tree(page.folder)) if page.folder else {}
        print(f"page folder after the load: {sum(names.values())} files: "
              + (", ".join(f"{n} x {name}" for name, n in sorted(names.items())) or "none"))
        refusals = [line for line in log if line.startswith("refused ")]
        print(f"server log during the load: {len(log)} lines, {len(refusals)} 'refused ...' lines for "
              f"{refused['no photo']} files that were no photo, {sum('Traceback' in line for line in log)} tracebacks")
        if refusals:
            print(f"  e.g. {refusals[0].strip()}")
        other = [line.rstrip() for line in log if not line.startswith("refused ")]
        ends = [i for i, line in enumerate(other) if i and line and not line[0].isspace()
                and other[i - 1].startswith(" ") and "Traceback" not in line]
        for end in ends[:3]:  # the exceptions of the first tracebacks, with their last frames
            print("\n".join(f"  | {line}" for line in other[max(0, end - 6): end + 1]))

        code = page.stop()
        left = tree(page.folder) if page.folder and os.path.exists(page.folder) else None
        gradio_after = tree(gradio_tmp)
        new_in_gradio = {p: s for p, s in gradio_after.items() if gradio_before.get(p) != s}
        print(f"after SIGTERM (exit {code}): page folder "
              f"{'removed' if left is None else f'still there, {len(left)} files'}; "
              f"{gradio_tmp}: {len(new_in_gradio)} new or changed files "
              f"({'absent' if not os.path.exists(gradio_tmp) else f'{len(gradio_after)} files in all'})")
        return 0 if not failures and left is None and not new_in_gradio else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(options.run_command(main, get_args_parser().parse_args()))
