"""On a real CUDA GPU (marked cuda: skipped without one; benchmarks/gpu_check.sh runs them with
python -m pytest -m cuda): a training run, fp16 loss scaling, bf16 autocast, the host syncs of a
training epoch, and a .onnx file in onnxruntime-gpu's CUDA provider. The CPU suite checks each of
these decisions with faked CUDA; these check them against the driver."""
import warnings

import pytest
import torch
from torch import nn

import train
from helpers import call, make_tree, needs, train_argv
from plumbing import device as dev

pytestmark = pytest.mark.cuda


def cuda_argv(tree, out, *extra):
    """train_argv on the GPU, in the precision --amp auto picks there."""
    argv = train_argv(tree, out, "--image-size", 64, *extra, amp=None)
    argv[argv.index("--device") + 1] = "cuda"
    return argv


def test_a_training_run_on_the_gpu(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    code, out, err = call(train, cuda_argv(tree, tmp_path / "out"))
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("data: ")]
    assert "device cuda:" in line
    assert "GPU " in out.splitlines()[-1]  # the peak allocated memory, on the last line
    assert (tmp_path / "out" / "best.pth").is_file()


def test_fp16_loss_scaling_skips_a_step_with_an_inf_gradient_and_halves_the_scale():
    placement = dev.place("cuda", "fp16")
    assert placement.amp_dtype == torch.float16
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2)).to(placement.device)
    model(torch.zeros(1, 3, 8, 8, device=placement.device))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = dev.grad_scaler(placement.device, placement.amp_dtype)
    assert scaler.is_enabled()
    x = torch.randn(4, 3, 8, 8, device=placement.device)
    with dev.autocast(placement.device, placement.amp_dtype):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    before, scale = [p.detach().clone() for p in model.parameters()], scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step was skipped
    assert scaler.get_scale() == scale / 2


def test_bf16_autocast_where_the_gpu_has_it_natively():
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    placement = dev.place("cuda", "bf16")
    conv = nn.Conv2d(3, 4, 3).to(placement.device)
    with dev.autocast(placement.device, placement.amp_dtype):
        assert conv(torch.randn(1, 3, 8, 8, device=placement.device)).dtype == torch.bfloat16


def test_a_training_epoch_waits_for_the_gpu_once_a_step(tmp_path, monkeypatch):
    """torch.cuda's sync debug mode warns at every operation that waits for the GPU: in an epoch,
    the stop vote's read of each step's loss, the right answers' count at the end, and the first
    copy of the normalisation's constants (made once per process)."""
    syncs, steps, real_epoch = [], [], train.train_one_epoch

    def watched_epoch(training, loaders, run, progress):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = real_epoch(training, loaders, run, progress)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.extend(str(w.message) for w in caught if "synchronizing" in str(w.message))
        steps.append(progress.step)
        return result

    monkeypatch.setattr(train, "train_one_epoch", watched_epoch)
    tree = make_tree(tmp_path / "data", n_train=8, n_val=1)
    code, _, err = call(train, cuda_argv(tree, tmp_path / "out", "--micro-batch", 2))
    assert code == 0, err
    assert steps == [6]
    assert len(syncs) <= steps[0] + 3, syncs


@needs("onnx", "onnxruntime", "onnxscript", why="ONNX export needs them: requirements-dev.txt")
def test_a_onnx_file_runs_in_the_cuda_provider(small_onnx):
    import numpy as np
    import onnxruntime

    from inference import runtimes

    if runtimes.CUDA_PROVIDER not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    model, _, preprocessing = runtimes.load_onnx(str(small_onnx), device="cuda")
    assert model.session.get_providers()[0] == runtimes.CUDA_PROVIDER
    images = np.zeros((2, 3, preprocessing.crop, preprocessing.crop), dtype=np.float32)
    assert model(images).shape == (2, 3)
