"""plumbing.distributed's collectives and the devices of what they carry, on the CPU.

NCCL, the backend of GPU runs, takes only tensors on the process's own GPU; gloo takes any, so a
CPU tensor in a CUDA run would pass every CPU test. A process group whose backend serves one device
type ("cpu:gloo", or "cuda:gloo", which serves CUDA tensors only as NCCL does) shows what holds:
every helper works where the devices agree, and a tensor on the wrong device is refused, by
distributed.on_run_device or by torch itself. One process (world size 1), in this process."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from plumbing import device as dev
from plumbing import distributed
from plumbing.options import UserError

pytestmark = pytest.mark.quick

CPU = torch.device("cpu")


@pytest.fixture
def group(request, tmp_path):
    dist.init_process_group(request.param, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield request.param
    finally:
        dist.destroy_process_group()


def small_model_and_ema():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model(torch.randn(5, 4))  # BatchNorm statistics that are not their initial values
    ema = AveragedModel(model, use_buffers=True)  # its n_averaged buffer: made on the CPU
    ema.update_parameters(model)
    return model, ema


@pytest.mark.parametrize("group", ["cpu:gloo"], indirect=True)
def test_every_helper_works_under_a_group_that_serves_cpu_tensors_only(group):
    assert distributed.is_distributed() and distributed.served_device_types() == {"cpu"}
    assert distributed.all_reduce_sum([1, 2.5], CPU) == [1.0, 2.5]
    assert distributed.any_process([True, False], CPU) == [True, False]
    distributed.fail_together(None, CPU)
    with pytest.raises(UserError, match="mine"):
        distributed.fail_together(UserError("mine"), CPU)
    assert distributed.run_on_main(CPU, lambda x: x + 1, 1) == 2
    assert distributed.all_gather({"a": 1}, CPU) == [{"a": 1}]
    assert distributed.from_machine_leader("/dev/shm/x", CPU) == "/dev/shm/x"
    distributed.barrier(CPU)
    model, ema = small_model_and_ema()
    before = [b.clone() for b in list(model.buffers()) + list(ema.buffers())]
    distributed.check_in_sync(model, ema, CPU)
    distributed.check_in_sync(model, ema)  # the device of the model's parameters
    assert all(torch.equal(a, b) for a, b in zip(before, list(model.buffers()) + list(ema.buffers()), strict=True))
    assert int(ema.n_averaged) == 1
    assert dev.pick_device("cpu") == CPU


@pytest.mark.parametrize("group", ["cuda:gloo"], indirect=True)
def test_a_cpu_tensor_in_a_cuda_run_is_refused(group):
    """'cuda:gloo' serves CUDA tensors only, as 'nccl' does; no GPU is needed to set it up."""
    assert distributed.served_device_types() == {"cuda"}
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        distributed.all_reduce_sum([1.0], CPU)  # torch's own refusal
    model, ema = small_model_and_ema()  # on the CPU, in a run on GPU 0: a bug, caught before any collective
    with pytest.raises(distributed.WrongDevice, match="a collective was handed a tensor on cpu, not on the run's "
                                                      "device cuda:0"):
        distributed.check_in_sync(model, ema, torch.device("cuda", 0))
    # --device cpu where the processes talk over NCCL: one line at start, not a failure at the first step
    with pytest.raises(UserError, match=r"^--device cpu under torchrun: the processes' collectives "
                                         r"\(cuda:gloo\) carry cuda tensors only; use --device auto, or hide "
                                         r"the GPUs \(CUDA_VISIBLE_DEVICES=\) to train on the CPU$"):
        dev.pick_device("cpu")


def test_the_device_check_of_collective_tensors():
    tensor = torch.zeros(2)
    assert distributed.on_run_device(tensor, "cpu") is tensor
    with pytest.raises(distributed.WrongDevice, match="on cpu, not on the run's device cuda:1"):
        distributed.on_run_device(tensor, torch.device("cuda", 1))
    with pytest.raises(distributed.WrongDevice, match="on meta, not on the run's device cpu"):
        distributed.on_run_device(torch.zeros(2, device="meta"), CPU)


@pytest.mark.parametrize("group", ["cpu:gloo"], indirect=True)
def test_object_collectives_check_the_current_gpu_is_the_runs(group, monkeypatch):
    """all_gather_object under NCCL sends from the current CUDA device: a process whose current
    device is not its run's GPU would share another process's (faked here: no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.all_gather("x", torch.device("cuda", 0)) == ["x"]
    for call in (lambda: distributed.all_gather("x", torch.device("cuda", 1)),
                 lambda: distributed.from_machine_leader("x", torch.device("cuda", 1)),
                 lambda: distributed.barrier(torch.device("cuda", 1))):
        with pytest.raises(distributed.WrongDevice, match="the current CUDA device is cuda:0, not the run's device "
                                                          "cuda:1: torch.cuda.set_device must come first"):
            call()
