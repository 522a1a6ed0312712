"""Where the model runs: the one place that picks the device and its precision (``place``)."""
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from plumbing import distributed
from plumbing.options import UserError


@dataclass(frozen=True)
class Placement:
    """The device, the autocast dtype (None: fp32), and the words the start-up line uses for them."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    precision: str
    warning: Optional[str]  # forced bf16 on a CPU without native bf16


def place(device="auto", amp="auto", local_rank=None):
    """The one device-and-precision set-up that train.py and predict.py share: picks the device
    (--device), tunes its backends and resolves --amp."""
    device = pick_device(device, local_rank)
    tune_backends(device)
    dtype = amp_dtype(device, amp)
    precision, warning = describe_precision(device, dtype)
    return Placement(device, dtype, precision, warning)


def pick_device(name="auto", local_rank=None):
    """'auto' is cuda when available, else cpu; also cpu, cuda, cuda:N and mps.

    Under torchrun each process takes the GPU of its LOCAL_RANK: with several processes an
    explicit cuda:N is refused (every process would take that one GPU), and so is a device whose
    tensors the process group cannot carry (--device cpu where NCCL was chosen for the GPUs).
    """
    device = _named_device(name, local_rank)
    served = distributed.served_device_types()
    if served is not None and device.type not in served:
        raise UserError(f"--device {name} under torchrun: the processes' collectives ({dist.get_backend()}) carry "
                        f"{' and '.join(sorted(served))} tensors only; use --device auto"
                        + (", or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"
                             if device.type == "cpu" else ""))
    return device


def _named_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        device = torch.device(name)
        processes = int(os.environ.get("WORLD_SIZE", 1))
        if device.index is not None and local_rank is not None and processes > 1:
            raise UserError(f"--device {name} with {processes} processes (torchrun): each process takes the GPU "
                            "of its LOCAL_RANK; pass --device cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if device.index is None:  # torch.cuda.set_device takes a GPU, not 'cuda': LOCAL_RANK's, else the current
            device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
        return device
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # the instructions that make bf16 fast on a CPU
# Set to 1 or 0, this says the CPU has (or lacks) native bf16 whatever it reports, so that what
# --amp auto decides can be tried on any machine: the test suite runs both ways on one CPU.
BF16_OVERRIDE = "GOOGLENET_CPU_BF16"


def cpu_bf16_flags(capabilities=None):
    """The native-bf16 instructions this CPU reports (empty on CPUs without them).

    Without capabilities given, GOOGLENET_CPU_BF16=1 or 0 in the environment overrides what the
    CPU reports (the list then names the variable instead of a flag).
    """
    if capabilities is None:
        forced = os.environ.get(BF16_OVERRIDE, "")
        if forced in ("0", "1"):
            return [f"{BF16_OVERRIDE}=1"] if forced == "1" else []
        if forced:
            raise UserError(f"{BF16_OVERRIDE}={forced}: expected 1 (treat the CPU as having native bf16) "
                            "or 0 (as lacking it); unset it to use what the CPU reports")
        capabilities = torch.cpu.get_capabilities()
    return [flag for flag in BF16_CPU_FLAGS if capabilities.get(flag)]


def amp_dtype(device, amp="auto", cpu_flags=None):
    """Mixed-precision dtype, or None for plain fp32.

    CUDA: bf16 where the GPU computes it natively (compute capability 8.0 on: Ampere and later), else
    fp16 with a GradScaler; older GPUs emulate bf16, slowly, and torch counts that unless asked for
    native support only. A CPU: bf16 only where it has
    native bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 runs many times slower than
    fp32, so 'auto' keeps fp32 and an explicit 'bf16' is obeyed but warned about (see describe_precision).
    """
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)):
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if amp == "fp16":
            raise UserError("--amp fp16 is for CUDA devices; on a CPU use --amp bf16 or off")
        native = bool(cpu_bf16_flags() if cpu_flags is None else cpu_flags)
        return torch.bfloat16 if amp == "bf16" or (amp == "auto" and native) else None
    if amp in ("bf16", "fp16"):
        raise UserError(f"--amp {amp} is for CUDA devices and CPUs; on {device.type} training runs in fp32")
    return None


def describe_precision(device, dtype, cpu_flags=None):
    """The start-up line's words for the precision, and a warning for bf16 on a CPU without it."""
    name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = "native bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no native bf16"
        return f"{name} (GPU of compute capability {major}.{minor}: {native})", None
    if device.type != "cpu":
        return name, None
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    if flags:
        return f"{name} (CPU has native bf16: {', '.join(flags)})", None
    warning = None
    if dtype == torch.bfloat16:
        warning = ("warning: --amp bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16): "
                   "it runs many times slower than fp32; use --amp auto")
    return f"{name} (CPU has no native bf16)", warning


def grad_scaler(device, dtype):
    """Loss scaling for fp16, whose narrow range would flush small gradients to zero; a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tune_backends(device):
    """Speed settings for the chosen device; they change no results beyond float rounding."""
    if device.type == "cpu":
        tune_cpu_allocator()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size per epoch: the fastest kernels are picked once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextmanager
def exact_fp32():
    """Matmuls and convolutions in full fp32, without the TF32 that tune_backends allows (and cuDNN
    uses by default) on Ampere and later GPUs: for the logits a temperature is fitted on. The
    settings are put back on exit."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tune_cpu_allocator():
    """Keep freed activation memory inside the process between training steps (glibc only).

    A training step allocates and frees gigabytes of activations. By default glibc hands every
    large block back to the kernel with munmap, and the next step page-faults it all in again,
    zeroed: measured here that costs 10-15% of a CPU training step. Other platforms are left as is.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30))
    except (OSError, AttributeError):
        return False


def peak_rss_gib():
    """Peak resident memory of this process, which holds the model and the image cache (0 where unknown).

    Not its children's: loader workers are forks that share its pages, and the children's figure
    also holds a fork that importing torch makes (to run ldconfig), which alone reports 0.4 GiB.
    """
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2 ** 20 if sys.platform != "darwin" else kib / 2 ** 30  # macOS counts bytes
