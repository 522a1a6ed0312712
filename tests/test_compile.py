"""--compile: what torch.compile is given, and a training run through the compiled model.

PyTorch's guidance for DistributedDataParallel is to compile the DDP-wrapped model (TorchDynamo's
DDPOptimizer then splits the graph at DDP's gradient buckets); the compiled model still offers DDP's
no_sync to the micro-batches. The compiler runs here with the aot_eager backend (train.py's
GOOGLENET_COMPILE_BACKEND): TorchDynamo's graph capture and AOTAutograd's forward and backward
graphs, without inductor's code generation, so a whole run takes seconds more on a CPU, not minutes."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import train
from helpers import call, make_tree, run_ranks, train_argv
from inference import checkpoint as ckpt
from inference import images
from plumbing import device as dev
from training import schedule


def _build_worker(rank, port, results):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        args = train.get_args_parser().parse_args(["--compile", "--micro-batch", "2"])
        record = ckpt.Record(["a", "b"], "paper", (32, 32), images.Preprocessing(32, 32), None, {})
        run = train.Run(args, rank, 2, dev.place("cpu", "off"), record)
        model = nn.Linear(4, 2)
        forward = train.build_training(args, run, model, nn.CrossEntropyLoss(), schedule.fixed_plan(1)).forward
        inner = getattr(forward, "_orig_mod", None)
        results.put((rank, type(forward).__name__, type(inner).__name__, getattr(inner, "module", None) is model,
                     getattr(forward, "no_sync", None) is not None))
    except BaseException:
        results.put((rank, "crash: " + traceback.format_exc(), None, None, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_under_torchrun_compile_wraps_the_ddp_model():
    for _, compiled, inner, wraps_the_model, has_no_sync in run_ranks(_build_worker):
        assert (compiled, inner) == ("OptimizedModule", "DistributedDataParallel"), compiled
        assert wraps_the_model and has_no_sync  # micro-batches still skip the sync of all but the last chunk


def test_a_compiled_run_trains_with_the_backend_the_variable_names(tmp_path, monkeypatch):
    real_compile, compiled = torch.compile, []

    def recording_compile(model, **kwargs):
        compiled.append((type(model).__name__, kwargs.get("backend")))
        assert kwargs.get("backend") == "aot_eager", kwargs  # not minutes of inductor on this CPU
        return real_compile(model, **kwargs)

    monkeypatch.setenv(train.COMPILE_BACKEND, "aot_eager")
    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    tree = make_tree(tmp_path / "data", n_train=2, n_val=1)
    try:
        code, out, err = call(train, train_argv(tree, tmp_path / "out", "--image-size", 32, "--compile",
                                                "--micro-batch", 2))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert code == 0, err
    assert compiled == [("GoogLeNet", "aot_eager")]  # one process: no DDP to wrap
    assert graphs >= 1  # the steps went through TorchDynamo
    assert "best val_accuracy" in out and (tmp_path / "out" / "best.pth").is_file()
