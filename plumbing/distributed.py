"""Several processes, one run (torchrun): the process group and every collective train.py makes.

Without torchrun every helper here is a cheap no-op, so train.py calls them unconditionally. A
failure that can happen in one process only (rank 0 writing a file, say) goes through
``run_on_main`` / ``fail_together``: every process learns of it at the same point and ends at
once, and only the process that failed prints its error. Without that, the others would wait at
their next collective until the process group's timeout (10-30 minutes with NCCL).
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


def init():
    """(rank, world_size, local_rank); (0, 1, None) when not launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return rank, world_size, local_rank


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
    dist.all_reduce(t)
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
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = function(*args)
        except UserError as e:
            error = e
    fail_together(error, device)
    return result


def local_rank_and_size():
    """(this process's rank on its machine, the number of processes there): (0, 1) without torchrun."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def from_machine_leader(obj):
    """The obj of this machine's first process (local rank 0), on every process of the machine.
    torchrun numbers a machine's processes with consecutive ranks, local rank 0 first."""
    if not is_distributed():
        return obj
    return all_gather(obj)[dist.get_rank() - local_rank_and_size()[0]]


def barrier():
    if is_distributed():
        dist.barrier()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_in_sync(model, ema=None):
    """After each epoch's training, every process must hold rank 0's model.

    DDP keeps the parameters identical (same start, same all-reduced gradients), and this checks
    it: each process compares its parameters with rank 0's (one broadcast of the weights, ~50 MB
    for GoogLeNet, once per epoch) and every process raises OutOfSync if any differs. The
    BatchNorm running statistics are different by design: DDP broadcasts them at the start of each
    training forward, so after the last step each process holds those of its own last batch. They
    are copied from rank 0 here (and those averaged into the EMA), so validation runs the model
    that rank 0 saves, on every process.
    """
    mine = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    diff = (mine - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # every process learns the verdict: none hangs
    for buffer in list(model.buffers()) + (list(ema.buffers()) if ema is not None else []):
        dist.broadcast(buffer, src=0)
    if diff.item() != 0:
        raise OutOfSync(f"the processes' weights diverged (largest difference from rank 0: "
                        f"{diff.item():.3g}): the distributed run is broken; rerun with one process")
