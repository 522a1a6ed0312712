"""benchmarks/gpu_check.sh, the one-command GPU check, through its --dry-run on the CPU: it lists the
commands of every check, runs those that need no GPU on a tiny folder it generates, prints its
table and exits non-zero when a check fails. (On a GPU it runs them all: docs/performance.md.)"""
import os
import stat
import subprocess
import sys

import pytest

from helpers import REPO, script_env

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
CHECKS = ["tiny data", "cuda tests", "train auto", "train fp16", "train off", "train compile", "train nchw", "resume",
          "torchrun", "predict pth", "predict onnx", "eval-only", "app"]
RUN_ON_THE_CPU = {"tiny data", "train auto", "predict pth", "eval-only"}


def gpu_check(*args, python=sys.executable, tmp=None):
    """bash benchmarks/gpu_check.sh ARGS with this python (its work folder under tmp)."""
    env = dict(script_env(), PYTHON=str(python), **({"TMPDIR": str(tmp)} if tmp else {}))
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)


def table(stdout):
    """{check: (result, its other columns)} and {check: its commands}, from the table after 'GPU check of'."""
    lines = stdout[stdout.index("GPU check of"):].splitlines()[2:]
    rows, commands = {}, {}
    for line in lines:
        name = next((c for c in CHECKS if line.startswith(c + "  ")), None)
        if name:
            rows[name] = line[len(name):].split()
        elif ": " in line and line.split(": ")[0] in CHECKS:
            commands[line.split(": ")[0]] = line.split(": ", 1)[1]
    return rows, commands


@pytest.mark.quick
def test_an_unknown_option_is_a_usage_error():
    proc = gpu_check("--bogus")
    assert proc.returncode == 2 and "usage:" in proc.stderr and "--bogus" in proc.stderr
    assert gpu_check("--help").stdout.startswith("usage:")


def test_the_dry_run_lists_every_command_runs_the_cpu_checks_and_fails_with_one(tmp_path):
    """A python that fails predict.py (exit 3) and runs everything else: the other CPU checks pass,
    the GPU ones are listed, the table says which failed, and the exit status is 1."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in predict.py) exit 3 ;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    proc = gpu_check("--dry-run", python=wrapper, tmp=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows, commands = table(proc.stdout)
    assert list(rows) == CHECKS and list(commands) == CHECKS, proc.stdout
    for name, cells in rows.items():
        expected = ("FAILED" if name == "predict pth" else "ok") if name in RUN_ON_THE_CPU else "listed"
        assert cells[0] == expected, (name, cells)
    assert "(exit 3)" in " ".join(rows["predict pth"])
    speed, compute_speed = rows["train auto"][2:4]  # result, seconds, img/s, compute img/s, GPU GiB
    assert float(speed) > 0 and float(compute_speed) > 0
    for name, fragment in [("cuda tests", "-m pytest -m cuda"), ("train fp16", "--amp fp16"),
                           ("train off", "--amp off"), ("train compile", "--compile"),
                           ("train nchw", "--no-channels-last"), ("resume", "--resume"),
                           ("torchrun", "torch.distributed.run --standalone --nproc-per-node 1 train.py"),
                           ("predict onnx", "--device cuda"), ("app", "gpu_check.py app")]:
        assert fragment in commands[name], (name, commands[name])
    assert "--data-path ../shared/flower_photos" in commands["train fp16"]  # listed as a GPU run makes them
    assert "--epochs 2" in commands["train fp16"] and "--device cpu" not in commands["train fp16"]
    assert "some checks FAILED: their logs are in" in proc.stdout
    kept = proc.stdout.strip().split("their logs are in ")[1]
    assert kept.startswith(str(tmp_path)) and os.path.isfile(os.path.join(kept, "predict-pth.log"))
