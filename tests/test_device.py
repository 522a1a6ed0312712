"""plumbing/device.py: the device and the precision a run takes (bf16 on CPUs that compute it
natively, fp32 elsewhere; the environment can force the choice), the CUDA-only choices (decided
from the device and the precision alone, so they are checked here on a machine without a GPU), and
what train.py says about them. Timings live in benchmarks/, never here."""
import os
import platform

import pytest
import torch

import train
from helpers import assert_clean_error, call, make_tree, train_argv
from inference import images
from model import GoogLeNet
from plumbing import device as dev
from plumbing.options import UserError
from training import data

CPU = torch.device("cpu")


def relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------
# bf16 on CPUs: the decision
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
def test_bf16_flags_are_read_from_the_cpu_capabilities(monkeypatch):
    monkeypatch.delenv(dev.BF16_OVERRIDE, raising=False)  # this test is about what the CPU itself reports
    assert dev.cpu_bf16_flags({"avx512_bf16": True, "amx_bf16": False, "avx2": True}) == ["avx512_bf16"]
    assert dev.cpu_bf16_flags({"avx512_bf16": True, "amx_bf16": True}) == ["avx512_bf16", "amx_bf16"]
    assert dev.cpu_bf16_flags({"avx2": True, "avx512_f": True}) == []
    reported = torch.cpu.get_capabilities()  # this machine's own answer has the keys we read
    assert all(flag in reported for flag in dev.BF16_CPU_FLAGS)
    assert dev.cpu_bf16_flags() == [f for f in dev.BF16_CPU_FLAGS if reported[f]]


@pytest.mark.quick
@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_environment_can_force_what_auto_decides(forced, monkeypatch):
    """GOOGLENET_CPU_BF16 lets one machine run the suite as either kind of CPU would."""
    monkeypatch.setenv(dev.BF16_OVERRIDE, forced)
    assert dev.amp_dtype(CPU, "auto") is (torch.bfloat16 if forced == "1" else None)
    words, warning = dev.describe_precision(CPU, dev.amp_dtype(CPU, "auto"))
    assert warning is None
    assert words == ("bf16 autocast (CPU has native bf16: GOOGLENET_CPU_BF16=1)" if forced == "1"
                     else "fp32 (CPU has no native bf16)")
    # injected flags still decide: the tests of the decision do not depend on the environment
    assert dev.amp_dtype(CPU, "auto", cpu_flags=[]) is None
    assert dev.amp_dtype(CPU, "auto", cpu_flags=["avx512_bf16"]) is torch.bfloat16
    monkeypatch.setenv(dev.BF16_OVERRIDE, "yes")
    with pytest.raises(UserError, match="GOOGLENET_CPU_BF16=yes: expected 1"):
        dev.amp_dtype(CPU, "auto")


@pytest.mark.quick
@pytest.mark.parametrize("flags", [[], ["avx512_bf16"], ["avx512_bf16", "amx_bf16"]])
def test_cpu_precision_follows_native_bf16(flags):
    native = bool(flags)
    assert dev.amp_dtype(CPU, "auto", cpu_flags=flags) is (torch.bfloat16 if native else None)
    assert dev.amp_dtype(CPU, "off", cpu_flags=flags) is None
    assert dev.amp_dtype(CPU, "bf16", cpu_flags=flags) is torch.bfloat16  # forced: obeyed either way
    with pytest.raises(UserError, match="fp16"):
        dev.amp_dtype(CPU, "fp16", cpu_flags=flags)
    words, warning = dev.describe_precision(CPU, dev.amp_dtype(CPU, "auto", cpu_flags=flags), cpu_flags=flags)
    assert words.startswith("bf16 autocast" if native else "fp32") and (flags[0] in words if native else True)
    assert warning is None
    words, warning = dev.describe_precision(CPU, torch.bfloat16, cpu_flags=flags)
    assert (warning is None) == native  # forced bf16 without native support is warned about
    if not native:
        assert "slower" in warning and "--amp auto" in warning


@pytest.mark.quick
def test_autocast_with_no_dtype_computes_in_fp32():
    with dev.autocast(CPU, None):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with dev.autocast(CPU, torch.bfloat16):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.quick
@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_bf16_logits_stay_close_to_fp32(variant):
    """bf16 keeps 8 significant bits (a rounding error of at most 2^-9 = 0.2% per value); the
    logits come out of ~60 rounded layers and differ by about 0.7% (measured): 3% is allowed. What
    the model does around its layers (the stem's ReLU after the pool, the concatenations, the
    heads) must keep working in bf16."""
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, init_weights=True, variant=variant).to(memory_format=torch.channels_last).eval()
    x = torch.randn(4, 3, 48, 48).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        reference = model(x)
        with dev.autocast(CPU, torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16 and reference.dtype == torch.float32
    assert relative_error(low, reference) < 3e-2


@pytest.mark.parametrize("native,amp,words,warned", [
    ("0", "bf16", "bf16 autocast (CPU has no native bf16)", True),  # forced: obeyed, and warned about
    ("1", "auto", "bf16 autocast (CPU has native bf16: GOOGLENET_CPU_BF16=1)", False),
    ("0", "auto", "fp32 (CPU has no native bf16)", False),
    ("1", "off", "fp32 (CPU has native bf16: GOOGLENET_CPU_BF16=1)", False),
])
def test_the_start_up_line_names_the_precision(small_run, tmp_path, monkeypatch, native, amp, words, warned):
    """train.py's line (place() is shared with training: --eval-only shows it without a run), on a
    CPU taken as one with native bf16 or without (GOOGLENET_CPU_BF16)."""
    monkeypatch.setenv(dev.BF16_OVERRIDE, native)
    code, out, err = call(train, ["--eval-only", "--weights", small_run["best"], "--data-path", small_run["data"],
                                  "--output-dir", tmp_path / "ev", "--device", "cpu", "--workers", 0, "--amp", amp])
    assert code == 0, err
    assert f"device cpu, {words}; " in out
    assert ("warning: --amp bf16 on a CPU without native bf16" in out) == warned


# ---------------------------------------------------------------------------------------------
# the CUDA-only choices, checked on a machine without a GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.quick
@pytest.mark.parametrize("capability,card,expected", [
    ((7, 0), "V100", torch.float16), ((7, 5), "T4, RTX 20xx", torch.float16),
    ((8, 0), "A100", torch.bfloat16), ((8, 6), "RTX 30xx", torch.bfloat16), ((9, 0), "H100", torch.bfloat16)])
def test_cuda_precision_follows_native_bf16(fake_cuda, capability, card, expected):
    """--amp auto: bf16 where the GPU computes it natively (compute capability 8.0 on, Ampere), fp16 with
    loss scaling before. Older cards emulate bf16, so torch.cuda.is_bf16_supported() answers yes for
    them by default (faked here as the driver answers: the emulation probe succeeds), and they would
    run a slow emulated bf16 instead of fp16."""
    gpus = fake_cuda(capability=capability)
    assert torch.cuda.is_bf16_supported()  # the default answer counts emulation: yes on every card here
    placement = dev.place("cuda", "auto")
    assert placement.device == torch.device("cuda", 0) and gpus.set_devices == [0]
    assert placement.amp_dtype is expected, card
    assert dev.grad_scaler(placement.device, placement.amp_dtype).is_enabled() == (expected is torch.float16)
    native = "native bf16" if expected is torch.bfloat16 else "no native bf16"
    assert placement.precision.endswith(f"(GPU of compute capability {capability[0]}.{capability[1]}: {native})")
    for amp, forced in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", None)):
        assert dev.amp_dtype(placement.device, amp) is forced


@pytest.mark.quick
def test_only_fp16_gets_a_loss_scaler():
    cpu = torch.device("cpu")  # the CPU's GradScaler behaves as CUDA's does, and exists here
    assert dev.grad_scaler(cpu, torch.float16).is_enabled()
    assert not dev.grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not dev.grad_scaler(cpu, None).is_enabled()


@pytest.mark.quick
def test_loader_pins_memory_only_for_cuda():
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8))
    sampler = data.EpochSampler(len(dataset), shuffle=False)
    assert data.make_loader(dataset, sampler, 2, 0, torch.device("cuda")).pin_memory
    assert not data.make_loader(dataset, sampler, 2, 0, torch.device("cpu")).pin_memory


@pytest.mark.quick
def test_loader_workers_by_device():
    assert images.default_workers("cpu", 32, cached=True) == 0  # the model's threads use every core
    assert images.default_workers("cpu", 32, items=1) == 0  # one photo: nothing to overlap
    assert images.default_workers("cpu", 32) == min(1, os.cpu_count() - 1)
    assert images.default_workers("cuda", 32, cached=True) == min(os.cpu_count(), 8)
    assert images.default_workers("cuda", 1) == 0


@pytest.mark.quick
def test_cuda_device_choice(fake_cuda, monkeypatch):
    """The real place() and pick_device(), through torch's own torch.cuda.set_device and its argument
    rules: only the driver is faked. 'cuda' alone names no GPU, and set_device refuses it."""
    gpus = fake_cuda(count=2, capability=(8, 0))
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        torch.cuda.set_device(torch.device("cuda"))  # the rule the fake keeps
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("auto", "cuda", "cuda:0"):
        placement = dev.place(name)
        assert placement.device == torch.device("cuda", 0), name
        assert torch.cuda.current_device() == 0
    assert dev.pick_device("cuda:1") == torch.device("cuda", 1)  # asked for by name, one process
    assert torch.cuda.current_device() == 1
    assert dev.pick_device("cuda") == torch.device("cuda", 1)  # 'cuda': torch's current GPU
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dev.pick_device("cuda:0", local_rank=0) == torch.device("cuda", 0)  # torchrun of one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("auto", "cuda"):  # torchrun's LOCAL_RANK
        assert dev.place(name, local_rank=1).device == torch.device("cuda", 1)
        assert torch.cuda.current_device() == 1
    assert gpus.set_devices == [0, 0, 0, 1, 1, 0, 1, 1]
    # by name with several processes: every process would take GPU 0
    with pytest.raises(UserError, match=r"^--device cuda:0 with 2 processes \(torchrun\): each process takes "
                                         "the GPU of its LOCAL_RANK; pass --device cuda"):
        dev.pick_device("cuda:0", local_rank=1)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="2 GPU"):
        dev.pick_device("cuda:2")
    assert len(gpus.set_devices) == 8


@pytest.mark.quick
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_train_on_a_gpu_gets_past_the_device_set_up(fake_cuda, tmp_path, capsys, device):
    """python train.py --device cuda (and the default, auto) with a GPU: torch's real set_device takes
    the device, the start-up line names it, and the run goes on until its first real allocation on
    the GPU, which this machine cannot make."""
    fake_cuda(count=1, capability=(8, 0))
    argv = train_argv(make_tree(tmp_path / "data", n_train=1, n_val=1), tmp_path / "out", amp="auto")
    argv[argv.index("--device") + 1] = device
    with pytest.raises(RuntimeError, match="NVIDIA driver"):  # the first tensor put on the GPU
        train.run(argv)
    assert "device cuda:0, bf16 autocast" in capsys.readouterr().out


@pytest.mark.quick
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_train_device_cuda_without_gpu_is_one_line(tmp_path):
    argv = train_argv(tmp_path / "data", tmp_path / "out")  # refused before the data is looked at
    argv[argv.index("--device") + 1] = "cuda"
    code, _, err = call(train, argv)
    assert_clean_error(code, err, "--device cuda", "--device cpu")


@pytest.mark.quick
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_the_cpu_allocator_setting_takes_on_linux():
    assert dev.tune_cpu_allocator() is True  # both mallopt calls accepted
