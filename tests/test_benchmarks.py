"""The benchmark scripts run and report what they measured (their figures are never asserted: speed
is measured by benchmarks, not by tests)."""
import io
import re
import sys

import pytest

from helpers import REPO, make_tree, run_script


def run(script, *args, timeout=900):
    return run_script(REPO / "benchmarks" / script, args, timeout=timeout)


def test_time_to_accuracy_reports_the_first_epoch_at_each_mark(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    proc = run("time_to_accuracy.py", "--marks", 0.0, 0.99, "--data-path", tree, "--output-dir",
               tmp_path / "out", "--class-indices", tmp_path / "ci.json", "--epochs", 2, "--batch-size", 4,
               "--image-size", 48, "--device", "cpu", "--amp", "off")
    assert proc.returncode == 0, proc.stderr
    epochs = re.findall(r"([\d.]+) min  epoch +(\d+)  val_accuracy ([\d.]+)", proc.stdout)
    assert [int(e) for _, e, _ in epochs] == [1, 2]
    assert "val accuracy >= 0.00: " + f"{float(epochs[0][0]):.1f} min (epoch 1)" in proc.stdout
    reached = [i for i, (_, _, a) in enumerate(epochs) if float(a) >= 0.99]
    expected = f"{float(epochs[reached[0]][0]):.1f} min (epoch {reached[0] + 1})" if reached else "not reached"
    assert f"val accuracy >= 0.99: {expected}" in proc.stdout
    assert f"final {float(epochs[-1][2]):.3f} (epoch 2)" in proc.stdout
    assert "command: python train.py --data-path" in proc.stdout and "flags" in proc.stdout


def test_time_to_accuracy_passes_train_py_errors_on(tmp_path):
    proc = run("time_to_accuracy.py", "--data-path", tmp_path / "missing", "--output-dir", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: data folder")


def test_time_to_accuracy_survives_a_chatty_stderr(tmp_path):
    # tqdm writes megabytes of progress bars in a long run: they must not stall the timed process
    sys.path.insert(0, str(REPO / "benchmarks"))
    import time_to_accuracy

    chatty = tmp_path / "chatty.py"
    chatty.write_text("import sys\nsys.stderr.write('x' * 4_000_000)\nprint('[epoch 1] val_accuracy: 0.500')\n"
                      "sys.stderr.write('last line\\n')\nsys.exit(3)\n")
    code, epochs, _ = time_to_accuracy.time_run([], out=io.StringIO(), script=str(chatty))
    assert code == 3 and [(e, a) for e, _, a in epochs] == [(1, 0.5)]


def test_benchmark_prediction_side_by_side(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx column needs onnxruntime (requirements-dev.txt)")
    pytest.importorskip("onnxscript", reason="the onnx column needs onnxscript (requirements-dev.txt)")
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    proc = run("benchmark.py", tree / "train", "--skip", "train", "bf16", "--rounds", 1, "--predict-images", 8,
               "--image-size", 64)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^predict +seed [\d.]+ \(\d+\) \| fp32 [\d.]+ \(\d+\) \| onnx [\d.]+ \(\d+\)$", proc.stdout, re.M)
    assert re.search(r"fp32/seed [\d.]+x  onnx/fp32 [\d.]+x", proc.stdout)
    assert "flags" in proc.stdout.splitlines()[0]
