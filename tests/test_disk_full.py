"""A disk that fills up: every save ends in the one-line error, the previous file stays intact and no
temporary file is left. The disk is really small: a tmpfs mounted for the test where this machine
lets it mount one (root), and otherwise a file-size limit (RLIMIT_FSIZE) on the script's process,
whose writes then fail as a full disk's do. Nothing is mocked."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import torch

from helpers import (
    FP32,
    PREDICT,
    REPO,
    SPLIT_DATA,
    TRAIN,
    assert_clean_error,
    make_tree,
    run_script,
    script_env,
    train_argv,
)

MB = 2 ** 20


def can_mount_tmpfs(tmp_path):
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return False
    probe = tmp_path / f"probe-{uuid.uuid4().hex[:6]}"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


class SmallDisk:
    """folder: where the script writes. With a tmpfs, it holds `size` bytes in all; with the limit,
    each file the script writes may hold `size` bytes. full=True: nothing more fits from the start."""

    def __init__(self, tmp_path, mode, size, full=False):
        self.folder, self.mode, self.size = tmp_path / "disk", mode, size
        self.folder.mkdir()
        if mode == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.folder)], check=True)
        if full:
            self.fill()

    def fill(self):
        """From now on nothing more fits."""
        if self.mode == "fsize":
            self.size = 16  # Python's own start-up probe of the temp folder writes 4 bytes
            return
        with open(self.folder / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    def run(self, script, args, cwd=REPO):
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.size))

        return run_script(script, args, cwd=cwd, preexec_fn=limit if self.mode == "fsize" else None)

    def leftovers(self):
        return [p for p in self.folder.rglob("*") if p.name.endswith((".tmp", ".part"))]

    def close(self):
        if self.mode == "tmpfs":
            subprocess.run(["umount", str(self.folder)], check=False)


@pytest.fixture(params=["tmpfs", "fsize"])
def disk_mode(request, tmp_path):
    if request.param == "tmpfs" and not can_mount_tmpfs(tmp_path):
        pytest.skip("this machine does not let the test mount a tmpfs: the file-size limit covers it")
    return request.param


@pytest.fixture
def small_disk(tmp_path, disk_mode):
    disks = []

    def make(size, full=False):
        disks.append(SmallDisk(tmp_path, disk_mode, size, full))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


@pytest.fixture(scope="module")
def tree_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    tree = make_tree(root / "data", n_train=2, n_val=1)
    out = root / "out"
    proc = subprocess.run([sys.executable, TRAIN, *map(str, train_argv(tree, out, "--image-size", 48))], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"data": tree, "best": out / "best.pth", "root": root}


def test_last_pth_on_a_full_disk_keeps_best_pth_and_ends_in_one_line(tree_and_weights, small_disk):
    """best.pth (41 MB) fits, last.pth (the weights plus Adam's two moments: 165 MB) does not."""
    disk = small_disk(64 * MB)
    out = disk.folder / "run"
    proc = disk.run(TRAIN, train_argv(tree_and_weights["data"], out, "--image-size", 48))
    line = assert_clean_error(proc.returncode, proc.stderr, os.path.join(str(out), "last.pth"), "previous file is intact")
    assert "inline_container" not in proc.stderr and "RuntimeError" not in proc.stderr
    assert disk.leftovers() == []
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)  # complete and loadable
    assert best["epoch"] == 1 and "fc.weight" in best["model"]
    assert not (out / "last.pth").exists()
    assert "No space left on device" in line or "File too large" in line


def test_a_disk_full_from_the_start_stops_training_before_it_begins(tree_and_weights, small_disk):
    disk = small_disk(1 * MB, full=True)
    proc = disk.run(TRAIN, train_argv(tree_and_weights["data"], disk.folder / "run", "--image-size", 48))
    line = assert_clean_error(proc.returncode, proc.stderr, "cannot write")
    assert "free some disk space" in line  # the output folder's probe, or with the limit class_indices.json
    assert "train 1/" not in proc.stdout and disk.leftovers() == []


def test_class_index_copy_on_a_full_disk(tree_and_weights, small_disk, disk_mode, tmp_path):
    if disk_mode == "fsize":
        pytest.skip("a file-size limit would stop the output folder's writes first: the tmpfs case covers this")
    disk = small_disk(1 * MB, full=True)
    argv = train_argv(tree_and_weights["data"], tmp_path / "run", "--image-size", 48)
    argv[argv.index("--class-indices") + 1] = str(disk.folder / "ci.json")
    proc = disk.run(TRAIN, argv)
    assert_clean_error(proc.returncode, proc.stderr, "cannot write the class index file", "ci.json")
    assert disk.leftovers() == []


def test_eval_only_confusion_matrix_on_a_full_disk(tree_and_weights, small_disk):
    disk = small_disk(1 * MB, full=True)
    proc = disk.run(TRAIN, [*FP32, "--eval-only", "--weights", tree_and_weights["best"], "--data-path",
                            tree_and_weights["data"], "--output-dir", disk.folder, "--device", "cpu"])
    line = assert_clean_error(proc.returncode, proc.stderr, "cannot write")
    assert "output folder" in line or "confusion_matrix.csv" in line
    assert disk.leftovers() == []


def test_prediction_csv_and_json_on_a_full_disk(tree_and_weights, small_disk):
    disk = small_disk(1 * MB, full=True)
    for name in ("p.csv", "p.json"):
        # no worker process: under the file-size limit even its semaphore's file could not be made
        proc = disk.run(PREDICT, [*FP32, tree_and_weights["data"] / "val", "--weights", tree_and_weights["best"],
                                  "--output", disk.folder / name, "--workers", 0])
        assert_clean_error(proc.returncode, proc.stderr, "cannot write", name, "free some disk space")
        assert not (disk.folder / name).exists()
    assert disk.leftovers() == []


def test_report_pngs_on_a_full_disk(tree_and_weights, small_disk):
    pytest.importorskip("matplotlib", reason="report.py's plots need matplotlib (requirements-dev.txt)")
    disk = small_disk(1 * MB)
    folder = disk.folder / "run"
    shutil.copytree(tree_and_weights["root"] / "out", folder, ignore=shutil.ignore_patterns("*.pth"))
    disk.fill()
    proc = disk.run(REPO / "report.py", [folder])
    assert_clean_error(proc.returncode, proc.stderr, "cannot write", "curves.png")
    assert not (folder / "curves.png").exists() and disk.leftovers() == []


def test_export_on_a_full_disk(tree_and_weights, small_disk):
    pytest.importorskip("onnxruntime", reason="export needs onnxruntime (requirements-dev.txt)")
    pytest.importorskip("onnxscript", reason="export needs onnxscript (requirements-dev.txt)")
    disk = small_disk(1 * MB, full=True)
    proc = disk.run(REPO / "export.py", ["--weights", tree_and_weights["best"], "--output", disk.folder / "m.onnx"])
    assert_clean_error(proc.returncode, proc.stderr, "cannot write", "m.onnx")
    assert not (disk.folder / "m.onnx").exists() and disk.leftovers() == []


def test_split_data_on_a_full_disk(tree_and_weights, small_disk):
    disk = small_disk(1 * MB, full=True)
    proc = disk.run(SPLIT_DATA, ["--source", tree_and_weights["data"] / "train",
                                                          "--dest", disk.folder / "split"])
    assert_clean_error(proc.returncode, proc.stderr, "cannot copy", "free some disk space")
