"""Data-parallel training on the CPU: two gloo processes launched by torch.distributed.run.

One tiny run (3 classes, 4 train + 3 val images each, 1 epoch, torchvision variant so BatchNorm
buffers are involved) is shared by the tests of this file. What it must show:
  - it exits 0 and train.py's own check reports "ranks in sync" (identical weights on both ranks);
  - the validation accuracy it prints is that of the saved weights evaluated by one process, over
    exactly the 9 val images (no padded duplicates);
  - only rank 0 writes files, logs and draws progress bars.
Plus a direct test of distributed.check_in_sync on two forked gloo processes, including the failure path.
Offline, CPU only.
"""
import csv
import os
import re
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import train
from helpers import FP32, REPO, call, free_port, last_line, make_tree, run_ranks
from inference import checkpoint
from model import GoogLeNet
from plumbing import distributed

CLASSES = ["daisy", "roses", "tulips"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 3
VAL_IMAGES = len(CLASSES) * VAL_PER_CLASS  # 9: odd, so splitting over 2 ranks pads if anything does


try:
    import tensorboard  # noqa: F401
    TENSORBOARD = ["--tensorboard"]  # only rank 0 may write its event file
except ImportError:
    TENSORBOARD = []


# ---------------------------------------------------------------------------------------------
# the shared two-process run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    data_path = str(make_tree(base / "data", CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS))
    # start from torchvision-variant weights (BatchNorm): the buffers must end up in sync too
    torch.manual_seed(1)
    start = GoogLeNet(num_classes=len(CLASSES), aux_logits=True, init_weights=True, variant="torchvision")
    weights = str(base / "start.pth")
    torch.save(start.state_dict(), weights)
    out_dir = str(base / "out")
    proc = torchrun(["train.py", "--data-path", data_path, "--output-dir", out_dir,
                     "--class-indices", str(base / "class_indices.json"), "--weights", weights,
                     "--epochs", "1", "--batch-size", "2", "--image-size", "48", "--workers", "0", "--cache", "off",
                     *FP32] + TENSORBOARD)
    return {"proc": proc, "data": data_path, "out": out_dir, "base": str(base)}


def torchrun(argv, log_dir=None, timeout=480):
    """2 gloo processes on this CPU, GPUs hidden, launched as README shows; with log_dir, each rank's stdout and
    stderr go to their own files there instead of being merged into the launcher's."""
    # CUDA_VISIBLE_DEVICES="": the CPU path, on any machine (with one GPU, rank 1 would ask for cuda:1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the loopback, whatever the host name resolves to
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *logs,
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *map(str, argv)]
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def describe(proc):
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def test_two_process_run_succeeds_with_ranks_in_sync(ddp_run):
    proc = ddp_run["proc"]
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.count("ranks in sync") == 1, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def test_only_rank_0_logs_and_draws_progress_bars(ddp_run):
    proc = ddp_run["proc"]
    assert proc.returncode == 0, describe(proc)
    both = proc.stdout + proc.stderr
    data_lines = [line for line in proc.stdout.splitlines() if line.startswith("data: ")]
    assert len(data_lines) == 1, describe(proc)
    assert "12 train, 9 val images" in data_lines[0] and "2 process(es)" in data_lines[0]
    assert len(re.findall(r"(?:^|\r)\[epoch 1\]", proc.stdout, flags=re.M)) == 1, describe(proc)
    assert both.count("best val_accuracy") == 1
    # a bar prints its bare 0% state (no rate, no loss yet) only when it is created: one training
    # bar and one validation bar. 12 training images over 2 ranks in batches of 2: 3 steps a rank;
    # rank 0's 5 val images in batches of 2: 3 batches.
    assert len(re.findall(r"train 1/1 \(48 px\):\s+0%\|[^|]*\| 0/3 \[[^\]]*\?it/s\]", both)) == 1, describe(proc)
    assert re.search(r"train 1/1 \(48 px\): 100%\|[^|]*\| 3/3 ", both), describe(proc)
    # the epoch's validation and the calibration pass after training, each drawn once
    assert len(re.findall(r"val:\s+0%\|[^|]*\| 0/3 \[[^\]]*\?it/s\]", both)) == 2, describe(proc)


def test_only_rank_0_writes_files(ddp_run):
    proc = ddp_run["proc"]
    assert proc.returncode == 0, describe(proc)
    # no temporary files, no .write-test, nothing from rank 1
    expected = (["best.pth", "class_indices.json", "last.pth", "metrics.csv", "suspect_labels.csv"]
                + (["tensorboard"] if TENSORBOARD else []))
    assert sorted(os.listdir(ddp_run["out"])) == expected
    if TENSORBOARD:
        (events,) = os.listdir(os.path.join(ddp_run["out"], "tensorboard"))  # one writer: rank 0's
        assert events.startswith("events.out.tfevents.")
    assert sorted(os.listdir(ddp_run["base"])) == ["class_indices.json", "data", "out", "start.pth"]
    with open(os.path.join(ddp_run["out"], "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"]
    last = checkpoint.load_checkpoint(os.path.join(ddp_run["out"], "last.pth"))
    assert last["epoch"] == 1 and last["step"] == 0 and last["variant"] == "torchvision"
    assert len(last["rng"]) == 2  # every rank's RNG state was gathered for an exact resume


def test_printed_val_accuracy_is_that_of_the_saved_weights_over_every_val_image(ddp_run, tmp_path):
    proc = ddp_run["proc"]
    assert proc.returncode == 0, describe(proc)
    printed = re.search(r"(?:^|\r)\[epoch 1\].*val_loss: (\S+)\s+val_accuracy: (\S+)", proc.stdout, flags=re.M)
    assert printed, describe(proc)
    with open(os.path.join(ddp_run["out"], "metrics.csv"), newline="") as f:
        row = next(csv.DictReader(f))
    assert f"{float(row['val_accuracy']):.3f}" == printed.group(2)

    # best.pth holds the weights that were validated: with the default --model-ema, the average
    # (last.pth's "model" is the raw weights, which were not)
    eval_dir = str(tmp_path / "eval")
    code, out, err = call(train, [
        *FP32, "--eval-only", "--weights", os.path.join(ddp_run["out"], "best.pth"), "--data-path", ddp_run["data"],
        "--output-dir", eval_dir, "--workers", "0", "--batch-size", "4", "--cache", "off"])
    assert code == 0, out + err
    m = re.search(r"(?:^|\r)accuracy: (\d\.\d{4}) \((\d+)/(\d+)\)  loss: (\S+)", out, flags=re.M)
    assert m, out
    correct, total = int(m.group(2)), int(m.group(3))
    assert total == VAL_IMAGES  # every val image exactly once
    # the same accuracy as the distributed run: printed (3 decimals) and in metrics.csv (6 digits),
    # where a padded 10-image count could not give the same value
    assert printed.group(2) == f"{correct / total:.3f}"
    assert float(row["val_accuracy"]) == pytest.approx(correct / total, abs=1e-5)
    # the mean loss would move with duplicated images even when the accuracy does not
    assert float(row["val_loss"]) == pytest.approx(float(m.group(4)), abs=2e-4)


# ---------------------------------------------------------------------------------------------
# a failure in one process ends every process at once, with one error line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["output-dir", "class-indices"])
def test_a_failure_on_rank_0_ends_both_processes_with_one_error_line(where, tmp_path):
    """Rank 0 alone writes the output folder and the class index file. When that fails, rank 1
    must not wait at its next collective for the process group's timeout (30 minutes with gloo,
    10-30 with NCCL): both processes end now, non-zero, rank 0 with the one-line error and rank 1
    silent, no traceback from either (the launcher's own report of failed children aside)."""
    data_path = make_tree(tmp_path / "data", CLASSES, 2, 1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out, indices = tmp_path / "out", tmp_path / "ci.json"
    if where == "output-dir":
        out = blocker / "weights"
    else:
        indices = blocker / "ci.json"
    proc = torchrun(["train.py", "--data-path", data_path, "--output-dir", out, "--class-indices", indices,
                     "--epochs", "1", "--batch-size", "2", "--image-size", "48", "--workers", "0", "--cache", "off",
                     *FP32], log_dir=tmp_path / "logs", timeout=300)
    assert proc.returncode != 0
    streams = {}
    for path in (tmp_path / "logs").rglob("*.log"):  # <run>/attempt_0/<rank>/stdout.log, stderr.log
        streams[(path.parent.name, path.stem)] = path.read_text()
    assert {rank for rank, _ in streams} == {"0", "1"}, sorted(streams)
    for (rank, stream), text in streams.items():
        assert "Traceback" not in text, (rank, stream, text)
    errors = [line for text in streams.values() for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, streams
    assert errors[0] == last_line(streams[("0", "stderr")])
    expected = "cannot write to output folder" if where == "output-dir" else "cannot write the class index file"
    assert expected in errors[0]


# ---------------------------------------------------------------------------------------------
# distributed.check_in_sync on two forked gloo processes (tiny model, no torchrun)
# ---------------------------------------------------------------------------------------------
def _sync_worker(rank, port, diverge, results):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        model[1].running_mean.fill_(rank + 1.0)  # as after a last step on different batches
        model[1].num_batches_tracked.fill_(10 * rank)
        if diverge and rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] += 1e-3
        try:
            distributed.check_in_sync(model)
            outcome = "ok"
        except distributed.OutOfSync as e:
            outcome = f"OutOfSync: {e}"
        results.put((rank, outcome, model[1].running_mean.tolist(), int(model[1].num_batches_tracked)))
    except BaseException:
        results.put((rank, "crash: " + traceback.format_exc(), None, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _run_sync(diverge):
    return run_ranks(_sync_worker, diverge)


@needs_fork
def test_sync_ranks_copies_rank0_buffers_and_passes_when_in_sync():
    got = _run_sync(diverge=False)
    for _, outcome, running_mean, tracked in got:
        assert outcome == "ok", outcome
        assert running_mean == [1.0, 1.0, 1.0] and tracked == 0  # rank 0's values everywhere


@needs_fork
def test_sync_ranks_raises_on_every_rank_when_weights_differ():
    got = _run_sync(diverge=True)
    for _, outcome, _, _ in got:
        assert outcome.startswith("OutOfSync: the processes' weights diverged"), outcome
        assert "1e-03" in outcome or "0.001" in outcome
