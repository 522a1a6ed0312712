"""The ways a GPU run goes, checked on the CPU: fp16 with its loss scaler (which torch also runs on
the CPU), resuming across precisions and onto fewer GPUs, more processes than GPUs, running out of
GPU memory, and loader workers that die of a small /dev/shm. GPUs are faked with helpers.FakeCuda
(conftest's fake_cuda: the driver only, torch's own rules stay); see test_device.py for the choice
of device and precision."""
import math
import os
import shutil
import signal

import pytest
import torch
from torch import nn

import train
from helpers import assert_clean_error, call, fp16_on_the_cpu, load, make_tree, stop_after_step, train_argv
from model import GoogLeNet
from plumbing import device as dev
from plumbing import stopping
from plumbing.options import UserError
from training import data, run_state

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("gpu") / "data", n_train=4, n_val=1)  # 3 steps of 4 an epoch


def tiny(tree, out, *extra, amp="auto", epochs=2, batch_size=4):
    return train_argv(tree, out, "--image-size", 32, "--val-resize", 40, *extra, amp=amp, epochs=epochs,
                      batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# fp16 and its loss scaler (GPUs without native bf16: V100, T4, GTX/RTX 10xx-20xx)
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_an_inf_gradient_skips_the_fp16_step_and_halves_the_scale(monkeypatch):
    """The scaler that an fp16 run gets (device.grad_scaler) on the placement fp16_on_the_cpu builds."""
    with pytest.raises(UserError, match="--amp fp16 is for CUDA devices"):
        dev.place("cpu", "fp16")  # what a user gets
    fp16_on_the_cpu(monkeypatch)
    placement = dev.place("cpu", "fp16")
    assert placement.amp_dtype is torch.float16 and placement.warning is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = dev.grad_scaler(placement.device, placement.amp_dtype)
    start = scaler.get_scale()
    broken = {"now": False}
    model[2].weight.register_hook(lambda g: torch.full_like(g, math.inf) if broken["now"] else g)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])

    def train_step():
        before = [p.detach().clone() for p in model.parameters()]
        with dev.autocast(placement.device, placement.amp_dtype):
            logits = model(x)
        assert logits.dtype == torch.float16
        scaler.scale(nn.functional.cross_entropy(logits.float(), y)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    assert not train_step() and scaler.get_scale() == start  # a finite step is taken
    broken["now"] = True
    assert train_step() and scaler.get_scale() == start / 2  # skipped: no weight moved, the scale halved
    broken["now"] = False
    assert not train_step() and scaler.get_scale() == start / 2


FP16_STEPS = 12  # 2 epochs of 6 steps of 2 images


def fp16_run(tree, out):
    """A tiny fp16 run of the paper's layout: BatchNorm over 2 images of 32 px (the torchvision
    layout's) gives gradients beyond fp16's range at any loss scale, as real batches do not."""
    return tiny(tree, out, "--variant", "paper", batch_size=2)


@pytest.fixture(scope="module")
def fp16_runs(tree, tmp_path_factory):
    """A 2-epoch fp16 run, uninterrupted ("whole"), and the same run stopped after step 7 ("cut":
    step 1 of epoch 2)."""
    root = tmp_path_factory.mktemp("fp16")
    with pytest.MonkeyPatch.context() as m:
        fp16_on_the_cpu(m)
        code, stdout, err = call(train, fp16_run(tree, root / "whole"))
        assert code == 0, err
        m.setattr(stopping.StopRequest, "check", stop_after_step(7, root / "cut", root / "epoch1.pth"))
        assert call(train, fp16_run(tree, root / "cut"))[0] == 128 + signal.SIGTERM
    return {"whole": root / "whole", "cut": root / "cut", "stdout": stdout}


def test_fp16_training_runs_with_its_loss_scaler(fp16_runs):
    """The scale starts at 2^16, where some of the gradients overflow fp16: the first steps are
    skipped, each halving the scale, until the gradients fit and the weights move."""
    assert "fp16 autocast" in fp16_runs["stdout"]
    last = load(fp16_runs["whole"] / "last.pth")
    scale, taken = last["scaler"]["scale"], int(last["optimizer"]["state"][0]["step"].item())
    assert 0 < taken < FP16_STEPS
    assert scale == 2.0 ** 16 / 2 ** (FP16_STEPS - taken)
    assert all(v.isfinite().all() for v in last["model"].values())


def test_an_fp16_run_resumes_bit_for_bit_with_its_scaler(fp16_runs, tmp_path, monkeypatch):
    fp16_on_the_cpu(monkeypatch)
    shutil.copytree(fp16_runs["cut"], tmp_path / "cut")
    saved = load(tmp_path / "cut" / "last.pth")
    assert saved["scaler"]["scale"] < 2.0 ** 16 and (saved["epoch"], saved["step"]) == (1, 1)
    code, out, err = call(train, ["--resume", tmp_path / "cut" / "last.pth"])
    assert code == 0, err
    whole, resumed = load(fp16_runs["whole"] / "last.pth"), load(tmp_path / "cut" / "last.pth")
    assert resumed["scaler"] == whole["scaler"]
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_a_resume_that_changes_the_precision_goes_on(fp16_runs, tmp_path, monkeypatch):
    """--amp auto resolves anew where a run resumes: a run saved in fp16 goes on in fp32 or bf16 (a
    CPU, a GPU with bf16), and one saved without a loss scaler (bf16 or fp32: its state is empty) goes
    on in fp16 (a GPU without bf16), its scaler starting from its first scale."""
    monkeypatch.setenv(dev.BF16_OVERRIDE, "0")  # this CPU's --amp auto: fp32
    shutil.copytree(fp16_runs["cut"], tmp_path / "fp16")
    code, out, err = call(train, ["--resume", tmp_path / "fp16" / "last.pth"])  # fp16 to fp32
    assert code == 0, err
    assert "device cpu, fp32" in out
    shutil.copytree(fp16_runs["cut"], tmp_path / "fp32")
    unscaled = load(tmp_path / "fp32" / "last.pth")
    unscaled["scaler"] = dev.grad_scaler(CPU, None).state_dict()  # what a run without fp16 saves
    assert unscaled["scaler"] == {}
    torch.save(unscaled, tmp_path / "fp32" / "last.pth")
    fp16_on_the_cpu(monkeypatch)
    code, out, err = call(train, ["--resume", tmp_path / "fp32" / "last.pth"])  # to fp16
    assert code == 0, err
    assert "device cpu, fp16 autocast" in out
    assert 0 < load(tmp_path / "fp32" / "last.pth")["scaler"]["scale"] <= 2.0 ** 16


def test_amp_given_anew_on_resume_is_one_line(fp16_runs):
    code, _, err = call(train, ["--resume", fp16_runs["cut"] / "last.pth", "--amp", "off"])
    assert_clean_error(code, err, "--amp off differs from the run's auto")


# ---------------------------------------------------------------------------------------------
# processes, memory, workers
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("local_rank", [0, 3])
def test_more_processes_than_gpus_is_one_line(fake_cuda, tmp_path, monkeypatch, local_rank):
    """torchrun --nproc-per-node 4 on a machine with 2 GPUs: every process ends with the same line,
    before any of them waits for the others."""
    fake_cuda(count=2)
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", 4)):
        monkeypatch.setenv(name, str(value))
    argv = train_argv(tmp_path / "data", tmp_path / "out")
    argv[argv.index("--device") + 1] = "auto"
    code, _, err = call(train, argv)
    line = assert_clean_error(code, err, "4 processes", "2 GPU", "--nproc-per-node 2")
    assert not torch.distributed.is_initialized(), line


@pytest.mark.parametrize("fail_at,kept", [(1, "nothing was saved yet"), (4, "last.pth keeps the run")])
def test_out_of_memory_is_one_line(tree, tmp_path, monkeypatch, fail_at, kept):
    """torch.OutOfMemoryError in a training step (raised here by the model's forward, at the given
    training step): one line naming the options that need less memory and what the run kept."""
    forward, steps = GoogLeNet.forward, {"n": 0}

    def out_of_memory_at(model, x):
        steps["n"] += model.training
        if model.training and steps["n"] == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(model, x)

    monkeypatch.setattr(GoogLeNet, "forward", out_of_memory_at)
    code, _, err = call(train, tiny(tree, tmp_path / "out", amp="off"))
    line = assert_clean_error(code, err, "out of memory", "--batch-size 4", "--micro-batch", "--image-size", kept)
    assert (tmp_path / "out" / "last.pth").exists() == (fail_at == 4)
    if fail_at == 4:
        assert f"python train.py --resume {tmp_path / 'out' / 'last.pth'}" in line


@pytest.mark.quick
def test_a_loader_worker_killed_by_a_bus_error_is_one_line(tree, tmp_path, monkeypatch):
    """A loader worker that hits a full /dev/shm (Docker gives 64 MB) dies of SIGBUS; here it sends
    itself one, and torch's DataLoader reports it as it would."""
    getitem = data.ImageDataset.__getitem__

    def bus_error_in_workers(dataset, item):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGBUS)
        return getitem(dataset, item)

    monkeypatch.setattr(data.ImageDataset, "__getitem__", bus_error_in_workers)
    code, _, err = call(train, tiny(tree, tmp_path / "out", "--workers", 1, amp="off"))
    assert_clean_error(code, err, "shared memory", "--workers 0", "--shm-size")


# ---------------------------------------------------------------------------------------------
# resuming on fewer GPUs
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_resume_on_fewer_gpus_restores_the_runs_own_gpu_generator(fake_cuda):
    """A run on cuda:1 of a 4-GPU machine saves its GPU's generator only, and a machine with one
    GPU takes it back (every GPU's state, restored GPU by GPU, ended in IndexError there)."""
    fake_cuda(count=4)
    device = dev.pick_device("cuda:1")
    torch.manual_seed(3)
    torch.cuda.default_generators[1].manual_seed(7)  # the run's GPU has a generator of its own
    saved = run_state.capture_rng_state(device)
    assert torch.equal(saved["cuda"], torch.cuda.get_rng_state(1))
    fake_cuda(count=1)  # the machine it resumes on
    device = dev.pick_device("auto")
    run_state.restore_rng_state(saved, device)
    assert torch.equal(torch.cuda.get_rng_state(device), saved["cuda"])
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    old = dict(saved, cuda=[torch.cuda.get_rng_state(0)] * 4)  # a last.pth from before: every GPU's state
    run_state.restore_rng_state(old, device)


@pytest.mark.quick
def test_cuda_resume_says_it_is_not_bit_for_bit():
    assert run_state.resume_promise(CPU) == "bit for bit"
    promise = run_state.resume_promise(torch.device("cuda", 0))
    assert promise.startswith("not bit for bit on a GPU") and "cudnn.benchmark" in promise
