"""The benchmark scripts run and report what they measured (their figures are never asserted: speed
is measured by benchmarks, not by tests)."""
import io
import os
import re
from pathlib import Path

from helpers import CLASSES, COLORS, REPO, make_tree, needs, run_script, save_image


def run(script, *args, timeout=900):
    return run_script(REPO / "benchmarks" / script, args, timeout=timeout)


def test_time_to_accuracy_reports_the_first_epoch_at_each_mark(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    proc = run("time_to_accuracy.py", "--marks", 0.0, 0.99, "--data-path", tree, "--output-dir",
               tmp_path / "out", "--class-indices", tmp_path / "ci.json", "--epochs", 2, "--batch-size", 4,
               "--image-size", 32, "--device", "cpu", "--amp", "off")
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


def test_time_to_accuracy_survives_a_chatty_stderr(tmp_path, monkeypatch):
    # tqdm writes megabytes of progress bars in a long run: they must not stall the timed process
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the benchmarks import each other as scripts do
    import time_to_accuracy

    chatty = tmp_path / "chatty.py"
    chatty.write_text("import sys\nsys.stderr.write('x' * 4_000_000)\nprint('[epoch 1] val_accuracy: 0.500')\n"
                      "sys.stderr.write('last line\\n')\nsys.exit(3)\n")
    code, epochs, _ = time_to_accuracy.time_run([], out=io.StringIO(), script=str(chatty))
    assert code == 3 and [(e, a) for e, _, a in epochs] == [(1, 0.5)]


@needs("onnxruntime", "onnxscript", why="the onnx column needs them: requirements-dev.txt")
def test_benchmark_prediction_side_by_side(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    proc = run("benchmark.py", tree / "train", "--skip", "train", "bf16", "--rounds", 1, "--predict-images", 8,
               "--image-size", 64)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^predict +seed [\d.]+ \(\d+\) \| fp32 [\d.]+ \(\d+\) \| onnx [\d.]+ \(\d+\)$", proc.stdout, re.M)
    assert re.search(r"fp32/seed [\d.]+x  onnx/fp32 [\d.]+x", proc.stdout)
    assert "flags" in proc.stdout.splitlines()[0]


@needs("onnx", "onnxruntime", "onnxscript", why="the ONNX rows need them: requirements-dev.txt")
def test_formats_prints_one_row_per_format_of_a_trained_model(small_run):
    proc = run("formats.py", "--weights", small_run["best"], "--batches", 1, "--calibration-images", 4)
    assert proc.returncode == 0, proc.stderr
    row = r"^\| ([a-z0-9 ]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$"
    rows = {m[0]: m[1:] for m in re.findall(row, proc.stdout, re.M)}
    native = "native bf16: yes" in proc.stdout  # bf16 rows only where the CPU computes bf16 natively
    expected = {"pytorch fp32", "onnx fp32", "onnx int8"} | ({"pytorch bf16"} if native else set())
    try:
        import openvino  # noqa: F401

        expected |= {"openvino fp32", "openvino int8"} | ({"openvino bf16"} if native else set())
    except ImportError:
        assert "openvino is not installed" in proc.stdout
    assert set(rows) == expected, proc.stdout
    assert rows["onnx fp32"][2] == "1.000"  # the same top class as PyTorch's fp32 for every photo
    assert float(rows["onnx int8"][0]) < float(rows["onnx fp32"][0]) < float(rows["pytorch fp32"][0])  # MB
    assert all(0 <= float(r[1]) <= 1 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows.values())
    assert "6 val photos at 60 px" in proc.stdout and "flags" in proc.stdout.splitlines()[0]


def test_startup_times_a_linked_folder_and_stops_after_the_first_step(tmp_path):
    source = tmp_path / "photos"
    for k, name in enumerate(CLASSES):
        for i in range(5):
            save_image(source / name / f"{i}.jpg", COLORS[k], seed=k * 10 + i)
    work = tmp_path / "work"
    proc = run("startup.py", "--source", source, "--photos", 24, "--work", work, "--cache", "off", "auto",
               "--image-size", 32)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| 24 \| (off|auto) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["off", "auto"], proc.stdout
    assert all(0 < float(data) <= float(step) and float(memory) > 0 for _, data, step, memory in rows)
    linked = sorted(p.relative_to(work / "24") for p in (work / "24").rglob("*.jpg"))
    assert len(linked) == 24 and {p.parts[0] for p in linked} == set(CLASSES)  # classes kept, 5 photos cycled
    assert all((work / "24" / p).stat().st_nlink > 1 for p in linked)  # hard links, no copies


def test_label_noise_flips_labels_accepts_the_first_suspects_and_trains_on_the_review(tmp_path):
    import csv

    photos, work = tmp_path / "photos", tmp_path / "work"
    for k, name in enumerate(CLASSES):
        for i in range(10):
            save_image(photos / name / f"{name}_{i:02d}.jpg", COLORS[k], seed=100 * k + i)
    proc = run("label_noise.py", "--data-path", photos, "--work", work, "--fraction", 0.2, "--accept", 6,
               "--skip-clean", "--epochs", 1, "--image-size", 32, "--batch-size", 8, "--device", "cpu", "--amp", "off",
               "--workers", 0)
    assert proc.returncode == 0, proc.stderr
    noisy = work / "noisy"
    # 9 training photos a class (1 held out), 2 of each linked under another class
    flipped = {str(p.relative_to(noisy)): Path(os.readlink(p)).parent.name for p in (noisy / "train").glob("*/*")
               if Path(os.readlink(p)).parent.name != p.parent.name}
    assert len(flipped) == 6 and "6 training photos under another class" in proc.stdout
    with open(work / "runs" / "noisy" / "suspect_labels.csv", newline="") as f:
        first = [(str(Path(r["file"]).relative_to(noisy)), r["given_class"], r["suggested_class"])
                 for r in list(csv.DictReader(f))[:6]]
    with open(noisy / "review.csv", newline="") as f:
        decided = [(r["file"], r["action"], r["class"]) for r in csv.DictReader(f)]
    assert decided == [(name, "keep", "") if given == suggested else (name, "relabel", suggested)
                       for name, given, suggested in first]
    relabelled = [(name, suggested) for name, given, suggested in first if given != suggested]
    found = sum(name in flipped for name, _, _ in first)
    restored = sum(flipped.get(name) == suggested for name, suggested in relabelled)
    assert (f"the first 6 suspects hold {found} of the 6 flipped photos; accepting their suggestions gave "
            f"{restored} flipped photos back their class and relabelled "
            f"{sum(name not in flipped for name, _ in relabelled)} clean ones") in proc.stdout
    assert f"review.csv: 0 excluded, {len(relabelled)} relabelled" in proc.stdout  # the reviewed run applied it
    assert re.search(r"^\| noisy \| [01]\.\d{3} \|\n\| reviewed \| [01]\.\d{3} \|$", proc.stdout, re.M)


def test_trust_trains_and_scores_each_candidate_and_skips_the_runs_it_has_finished(tmp_path):
    data, others = tmp_path / "data", tmp_path / "others"
    for k, name in enumerate(CLASSES):
        for i in range(6):
            save_image(data / name / f"{name}_{i}.jpg", COLORS[k], seed=k * 100 + i)
    for i in range(5):
        save_image(others / f"other_{i}.png", COLORS[3 + i % 2], seed=500 + i)
    work = tmp_path / "work"
    args = ("--data-path", data, "--unknowns", others, "--held-out", "tulips", "--work", work, "--candidates",
            "default", "logitnorm", "--epochs", 1, "--image-size", 32, "--batch-size", 4, "--val-ratio", 0.34,
            "--workers", 0, "--device", "cpu", "--amp", "off")
    dry = run("trust.py", *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    trains = [line for line in dry.stdout.splitlines() if line.startswith("  $ python") and "--eval-only" not in line]
    assert len(trains) == 4 and sum("--logit-norm 0.04" in line for line in trains) == 2
    assert not work.exists()  # a dry run writes nothing

    proc = run("trust.py", *args)
    assert proc.returncode == 0, proc.stderr
    number = r"([\d.]+)"
    row = (rf"^\| (default|logitnorm) \| 0 \| `([^`]+)` \| {number} \| {number} \| {number} \| {number} "
           rf"\(val, in-sample\) \| {number} \| - \| {number} \| max_probability \| {number} \|$")
    rows = {m[0]: m[1:] for m in re.findall(row, proc.stdout, re.M)}
    assert set(rows) == {"default", "logitnorm"}, proc.stdout
    assert rows["default"][0] == "(defaults)" and rows["logitnorm"][0] == "--logit-norm 0.04"
    assert rows["default"][3] == "1.00"  # minutes against the default's
    for _, accuracy, minutes, _, ece, far, near, test_accuracy in rows.values():
        assert 0 <= float(accuracy) <= 1 and float(minutes) >= 0 and 0 <= float(ece) <= 1  # a tiny run: 0.0 min
        assert 0 <= float(far) <= 1 and 0 <= float(near) <= 1 and float(test_accuracy) == float(accuracy)
    assert (work / "table.md").read_text().strip() == proc.stdout.split("\n\n")[-2].strip()
    assert sorted(p.name for p in (work / "near-data").iterdir()) == ["daisy", "roses"]

    again = run("trust.py", *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done already") == 4 and "$ python" not in again.stdout
    assert (work / "table.md").read_text().strip() in again.stdout


def test_trust_refuses_what_it_sets_itself_and_unknown_candidates(tmp_path):
    base = ("--data-path", tmp_path, "--unknowns", tmp_path, "--dry-run")
    for extra, words in ((("--seed", 3), "--seed is this script's to set"),
                         (("--candidates", "magic"), "no candidate magic")):
        proc = run("trust.py", *base, *extra)
        assert proc.returncode == 2 and words in proc.stderr.strip().splitlines()[-1], proc.stderr
