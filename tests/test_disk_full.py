"""A disk that fills up: every save ends in the one-line error, the previous file stays intact and no
temporary file is left. The disk is really small, and nothing is mocked about it: a tmpfs mounted for
the test where this machine lets it mount one (root), the commands then running in this process; and
otherwise a file-size limit (RLIMIT_FSIZE) on the command's own process, whose writes then fail as a
full disk's do."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import torch

import export
import predict
import report
import train
from data_set import split_data
from helpers import COLORS, FP32, SPLIT_DATA, assert_clean_error, call, eval_argv, run_script, save_image, train_argv

MB = 2 ** 20


def can_mount_tmpfs(folder):
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return False
    probe = folder / f"probe-{uuid.uuid4().hex[:6]}"
    probe.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


@pytest.fixture(scope="module")
def disk_mode(tmp_path_factory):
    """One way per machine: a tmpfs where it can be mounted, a file-size limit elsewhere."""
    return "tmpfs" if can_mount_tmpfs(tmp_path_factory.mktemp("probe")) else "fsize"


class SmallDisk:
    """folder: where the command writes. With a tmpfs, it holds `size` bytes in all; with the limit,
    each file the command writes may hold `size` bytes. full=True: nothing more fits from the start."""

    def __init__(self, tmp_path, mode, size, full=False):
        self.folder, self.mode, self.size = tmp_path / "disk", mode, size
        self.folder.mkdir()
        if mode == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.folder)], check=True)
        if full:
            self.fill()

    def fill(self, room=0):
        """From now on nothing more fits but `room` bytes (a tmpfs gives them in whole pages)."""
        if self.mode == "fsize":
            self.size = max(16, room)  # Python's own start-up probe of the temp folder writes 4 bytes
            return
        with open(self.folder / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        if room:
            os.truncate(self.folder / "filler", os.path.getsize(self.folder / "filler") - room)

    def free(self):
        """Room again, as after deleting other files."""
        if self.mode == "fsize":
            self.size = resource.RLIM_INFINITY
        else:
            os.remove(self.folder / "filler")

    def run(self, module, args):
        """(exit code, stdout, stderr) of the command: module.run(args) in this process on a tmpfs, the
        command's own process under the file-size limit."""
        if self.mode == "tmpfs":
            return call(module, args)

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self.size))

        script = SPLIT_DATA if module is split_data else module.__file__
        proc = run_script(script, args, preexec_fn=limit)
        return proc.returncode, proc.stdout, proc.stderr

    def leftovers(self):
        return [p for p in self.folder.rglob("*") if p.name.endswith((".tmp", ".part"))]

    def close(self):
        if self.mode == "tmpfs":
            subprocess.run(["umount", str(self.folder)], check=False)


def assert_full_disk_line(code, err, *fragments):
    """The one line of a write that did not fit, saying so and what to do. The first write may be
    the output folder's lock (plumbing/run_lock.py), before any other file."""
    line = assert_clean_error(code, err, *fragments)
    assert "No space left on device" in line or "File too large" in line, line
    assert "free some disk space" in line or "with some free space" in line, line
    return line


@pytest.fixture
def small_disk(tmp_path, disk_mode):
    disks = []

    def make(size, full=False):
        disks.append(SmallDisk(tmp_path, disk_mode, size, full))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()


def test_last_pth_on_a_full_disk_keeps_best_pth_and_ends_in_one_line(small_run, small_disk):
    """best.pth (41 MB) fits, last.pth (the weights plus Adam's two moments: 165 MB) does not."""
    disk = small_disk(64 * MB)
    out = disk.folder / "run"
    code, _, err = disk.run(train, train_argv(small_run["data"], out, "--image-size", 48))
    line = assert_clean_error(code, err, os.path.join(str(out), "last.pth"), "previous file is intact")
    assert "inline_container" not in err and "RuntimeError" not in err
    assert disk.leftovers() == []
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)  # complete and loadable
    assert best["epoch"] == 1 and "fc.weight" in best["model"]
    assert not (out / "last.pth").exists()
    assert "No space left on device" in line or "File too large" in line


def test_a_disk_full_from_the_start_stops_training_before_it_begins(small_run, small_disk):
    disk = small_disk(1 * MB, full=True)
    code, out, err = disk.run(train, train_argv(small_run["data"], disk.folder / "run", "--image-size", 48))
    assert_full_disk_line(code, err, str(disk.folder / "run"))
    assert "train 1/" not in out and disk.leftovers() == []


def test_class_index_copy_on_a_full_disk(small_run, small_disk, disk_mode, tmp_path):
    if disk_mode == "fsize":
        pytest.skip("a file-size limit would stop the output folder's writes first: a tmpfs is needed")
    disk = small_disk(1 * MB, full=True)
    argv = train_argv(small_run["data"], tmp_path / "run", "--image-size", 48)
    argv[argv.index("--class-indices") + 1] = str(disk.folder / "ci.json")
    code, _, err = disk.run(train, argv)
    assert_clean_error(code, err, "cannot write the class index file", "ci.json")
    assert disk.leftovers() == []


def test_eval_only_confusion_matrix_on_a_full_disk(small_run, small_disk):
    disk = small_disk(1 * MB, full=True)
    code, _, err = disk.run(train, eval_argv(small_run["best"], small_run["data"], disk.folder))
    assert_full_disk_line(code, err, str(disk.folder))
    assert disk.leftovers() == [] and not (disk.folder / "confusion_matrix.csv").exists()


def test_prediction_csv_and_json_on_a_full_disk(small_run, small_disk):
    disk = small_disk(1 * MB, full=True)
    for name in ("p.csv", "p.json"):
        # no worker process: under the file-size limit even its semaphore's file could not be made
        code, _, err = disk.run(predict, [*FP32, small_run["data"] / "val", "--weights", small_run["best"],
                                          "--output", disk.folder / name, "--workers", 0])
        assert_full_disk_line(code, err, "cannot write", name)
        assert not (disk.folder / name).exists()
    assert disk.leftovers() == []


def test_a_prediction_csv_that_fills_the_disk_ends_in_one_line_and_the_same_command_continues(
        small_run, small_disk, tmp_path):
    """A disk that fills up while the rows stream in: one line saying how many photos are in the
    file and that the same command continues, no traceback; then, with room again, it does."""
    photos = tmp_path / "photos"
    for i in range(24):  # long names: a row of about 300 bytes, so that a page holds a dozen
        save_image(photos / f"{'long_name_' * 16}{i:02d}.jpg", COLORS[i % 3], seed=i)
    disk = small_disk(1 * MB)
    disk.fill(room=4096)
    output = disk.folder / "p.csv"
    argv = [*FP32, photos, "--weights", small_run["best"], "--output", output, "--batch-size", 4, "--workers", 0]
    code, _, err = disk.run(predict, argv)
    kept = output.read_text(encoding="utf-8").splitlines()
    assert kept[0].startswith("file,class,") and output.read_bytes().endswith(b"\n")
    assert all(len(row.split(",")) == 6 and row.count(".jpg") == 1 for row in kept[1:]), kept
    n = len(kept) - 1
    assert 0 < n < 24, kept
    line = assert_full_disk_line(code, err, "cannot write", str(output), f"{n} of 24 photos",
                                 "run the same command again")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert disk.leftovers() == []

    disk.free()
    code, out, err = disk.run(predict, argv)
    assert code == 0, err
    assert f"{n} of 24 photos are in {output} already" in out, (line, out)
    files = [row.split(",")[0] for row in output.read_text(encoding="utf-8").splitlines()[1:]]
    assert sorted(files) == sorted(str(p) for p in photos.iterdir())


def test_report_pngs_on_a_full_disk(small_run, small_disk):
    pytest.importorskip("matplotlib", reason="report.py's plots need matplotlib (requirements-dev.txt)")
    disk = small_disk(1 * MB)
    folder = disk.folder / "run"
    shutil.copytree(small_run["out"], folder, ignore=shutil.ignore_patterns("*.pth"))
    disk.fill(room=4096)  # the folder's lock fits, the plot does not
    code, _, err = disk.run(report, [folder])
    assert_full_disk_line(code, err, "cannot write", "curves.png")
    assert not (folder / "curves.png").exists() and disk.leftovers() == []


def test_export_on_a_full_disk(small_run, small_disk, disk_mode, monkeypatch, request):
    pytest.importorskip("onnxruntime", reason="export needs onnxruntime (requirements-dev.txt)")
    pytest.importorskip("onnxscript", reason="export needs onnxscript (requirements-dev.txt)")
    if disk_mode == "tmpfs":  # in this process: the session's export stands in for the conversion
        blob = request.getfixturevalue("small_onnx").read_bytes()
        monkeypatch.setattr(export, "to_onnx", lambda *args, **kwargs: (blob, 0.0))
    disk = small_disk(1 * MB, full=True)
    code, _, err = disk.run(export, ["--weights", small_run["best"], "--output", disk.folder / "m.onnx"])
    assert_full_disk_line(code, err, "cannot write", "m.onnx")
    assert not (disk.folder / "m.onnx").exists() and disk.leftovers() == []


def test_split_data_on_a_full_disk(small_run, small_disk):
    disk = small_disk(1 * MB, full=True)
    code, _, err = disk.run(split_data, ["--source", small_run["data"] / "train", "--dest", disk.folder / "split"])
    assert_full_disk_line(code, err, "cannot copy")
