"""Several processes, one run (torchrun): the process group and every collective train.py makes.

Without torchrun every helper here is a cheap no-op, so train.py calls them unconditionally. A
failure that can happen in one process only (rank 0 writing a file, say) goes through
``run_on_main`` / ``fail_together``: every process learns of it at the same point and ends at
once, and only the process that failed prints its error. Without that, the others would wait at
their next collective until the process group's timeout (10-30 minutes with NCCL).

NCCL, the backend on GPU machines, takes only tensors on the process's own GPU, and its object
collectives use the current CUDA device (init sets it to LOCAL_RANK's GPU before the group exists;
device.pick_device keeps the run on that GPU). Every tensor handed to a collective here passes
``on_run_device``, so a tensor off the run's device is caught on any machine, gloo included.
"""
import os

import torch
import torch.distributed as dist

from plumbing.options import UserError


class PeerFailed(UserError):
    """Another process failed and prints why; this one ends quietly with a non-zero exit."""

    exit_code = 1

    def __init__(self):
        super().__init__("")  # run_command prints nothing for it


class OutOfSync(UserError):
    """The processes' weights differ: the distributed run is broken."""

    exit_code = 1


class WrongDevice(AssertionError):
    """A bug: a collective handed a tensor that is not on the run's device, or an object collective
    about to run on another GPU than the run's. NCCL serves CUDA tensors only, each process on its
    own GPU; gloo, which the tests and CPU runs use, takes tensors of any device, so without this
    check such a bug would show only on GPU machines."""


def run_device(device):
    """The run's torch.device, with its GPU's index ('cuda' alone means the current GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_run_device(tensor, device):
    """tensor, checked to be on the run's device: the one check of every tensor that a collective
    here is handed."""
    expected = run_device(device)
    if tensor.device != expected:
        raise WrongDevice(f"a collective was handed a tensor on {tensor.device}, not on the run's device {expected}")
    return tensor


def check_current_gpu(device):
    """Object collectives (all_gather_object) put their bytes on the current CUDA device: under
    NCCL it must be the run's GPU (torch.cuda.set_device), else two processes would share one."""
    if device is None or torch.device(device).type != "cuda":
        return
    expected, current = run_device(device), torch.cuda.current_device()
    if current != expected.index:
        raise WrongDevice(f"the current CUDA device is cuda:{current}, not the run's device {expected}: "
                          "torch.cuda.set_device must come first")


def served_device_types():
    """The device types whose tensors the process group's collectives take ({'cuda'} for NCCL,
    {'cpu', 'cuda'} for gloo), or None without a process group."""
    if not is_distributed():
        return None
    return {part.split(":")[0] for part in dist.get_backend_config().split(",")}


def init():
    """(rank, world_size, local_rank); (0, 1, None) when not launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count()
        if max(processes, local_rank + 1) > gpus:  # every process of the machine sees it: all end here, none waits
            raise UserError(f"torchrun started {processes} processes on this machine, which has {gpus} GPU(s): "
                            f"pass --nproc-per-node {gpus} or fewer (one process per GPU)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return rank, world_size, local_rank


def early_device():
    """The device of a collective made before the run's own is placed (device.place): the current
    GPU where the process group carries CUDA tensors only (NCCL: init made it this process's), else
    the CPU."""
    return torch.device("cuda") if served_device_types() == {"cuda"} else torch.device("cpu")


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def close():
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of numbers over every process (a no-op without a process group)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(on_run_device(t, device))
    return t.tolist()


def any_process(flags, device):
    """For each flag, whether it is true in any process: the one vote per training step that tells
    every process about a stop request or a diverged loss, so all of them act at the same step."""
    return [total > 0 for total in all_reduce_sum([float(f) for f in flags], device)]


def fail_together(error, device):
    """Every process calls this at the same point with the UserError it hit there, or None. If any
    process hit one, every process raises: that one its own error, the others PeerFailed."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    (failed,) = any_process([error is not None], device)
    if error is not None:
        raise error
    if failed:
        raise PeerFailed()


def run_on_main(device, function, *args):
    """function(*args) on rank 0 only (writing a file, downloading), then fail_together: its
    UserError reaches every process at once. Returns its result on rank 0, None elsewhere."""
    if not is_distributed():
        return function(*args)
    result, error = _attempt(function, args) if dist.get_rank() == 0 else (None, None)
    fail_together(error, device)
    return result


def run_everywhere(device, function, *args):
    """function(*args) in every process (a check whose answer may differ between them: a folder one
    machine lacks), then fail_together: a UserError in one process ends every process at once."""
    result, error = _attempt(function, args)
    fail_together(error, device)
    return result


def _attempt(function, args):
    """(function(*args), None), or (None, the UserError it raised)."""
    try:
        return function(*args), None
    except UserError as e:
        return None, e


def local_rank_and_size():
    """(this process's rank on its machine, the number of processes there): (0, 1) without torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def from_machine_leader(obj, device=None):
    """The obj of this machine's first process (local rank 0), on every process of the machine.
    torchrun numbers a machine's processes with consecutive ranks, local rank 0 first."""
    if not is_distributed():
        return obj
    return all_gather(obj, device)[dist.get_rank() - local_rank_and_size()[0]]


def barrier(device=None):
    """Wait for every process (NCCL's barrier runs on the current CUDA device: checked as all_gather does)."""
    if is_distributed():
        check_current_gpu(device)
        dist.barrier()


def all_gather(obj, device=None):
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] without a process group). With
    the run's device given, checks first that it is the current CUDA device, which NCCL uses."""
    if not is_distributed():
        return [obj]
    check_current_gpu(device)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_in_sync(model, ema=None, device=None):
    """After each epoch's training, every process must hold rank 0's model.

    DDP keeps the parameters identical (same start, same all-reduced gradients), and this checks
    it: each process compares its parameters with rank 0's (one broadcast of the weights, ~50 MB
    for GoogLeNet, once per epoch) and every process raises OutOfSync if any differs. The
    BatchNorm running statistics are different by design: DDP broadcasts them at the start of each
    training forward, so after the last step each process holds those of its own last batch. They
    are copied from rank 0 here (and those averaged into the EMA), so validation runs the model
    that rank 0 saves, on every process.

    device: the run's (default: that of the model's parameters). Every tensor goes through the
    collectives there, as NCCL requires: a buffer kept elsewhere (AveragedModel's n_averaged is
    made on the CPU unless it is given a device) travels through a copy on the run's device.
    """
    device = run_device(device if device is not None else next(model.parameters()).device)
    mine = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    reference = mine.clone()
    dist.broadcast(on_run_device(reference, device), src=0)
    diff = (mine - reference).abs().max().reshape(1)
    dist.all_reduce(on_run_device(diff, device), op=dist.ReduceOp.MAX)  # every process learns the verdict
    for buffer in list(model.buffers()) + (list(ema.buffers()) if ema is not None else []):
        shipped = buffer if buffer.device == device else buffer.to(device)
        dist.broadcast(on_run_device(shipped, device), src=0)
        if shipped is not buffer:
            buffer.copy_(shipped)
    if diff.item() != 0:
        raise OutOfSync(f"the processes' weights diverged (largest difference from rank 0: "
                        f"{diff.item():.3g}): the distributed run is broken; rerun with one process")
