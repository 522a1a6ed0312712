"""Reads of device tensors from the host in a training epoch (.item(), .tolist(), .cpu(), bool(),
int(), float(), .nonzero()...). On a GPU each read waits for every kernel queued before it, so the
CPU stops feeding the GPU until the GPU is idle. A step makes one read by design: the stop vote
reads the step's loss (training/step.py vote; under DDP every process learns whether it diverged).
Every other count is kept on the device and read once per log line, the epoch's (its training
accuracy); the constants a batch needs are copied to the device once, not for every batch.

On the CPU the reads cost nothing, but they are the same Python calls, so they are counted here by
wrapping them. Reads inside the data loader (its sampler, the transforms' random draws) are of host
tensors by construction and are left out."""
import os
import sys

import pytest
import torch

import train
from helpers import REPO, call, make_tree, train_argv

READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
LOADER = os.path.join("torch", "utils", "data") + os.sep
BY_DESIGN = {"training/step.py:vote"}  # the one read a step makes


class HostReads:
    """What the wrapped calls saw while counting: per read, the repository functions on its stack
    (innermost first); per host-to-device copy of Python numbers (torch.tensor(..., device=...)), its site."""

    def __init__(self):
        self.counting = False
        self.reads, self.copies = [], []

    def sites(self):
        """The repository functions on the current stack, innermost first, as 'path:function';
        None for a read made inside the data loader."""
        found = []
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if LOADER in name:
                return None
            if name.startswith(str(REPO)) and os.sep + "tests" + os.sep not in name:
                found.append(f"{os.path.relpath(name, REPO)}:{frame.f_code.co_name}")
            frame = frame.f_back
        return found

    def wrap_read(self, original):
        def read(tensor, *args, **kwargs):
            if self.counting:
                sites = self.sites()
                if sites is not None:
                    self.reads.append(sites)
            return original(tensor, *args, **kwargs)
        return read

    def wrap_copy(self, original):
        def tensor(data, *args, **kwargs):
            if self.counting and kwargs.get("device") is not None:
                self.copies.append(self.sites())
            return original(data, *args, **kwargs)
        return tensor


@pytest.fixture
def host_reads(monkeypatch):
    log = HostReads()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, log.wrap_read(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", log.wrap_copy(torch.tensor))
    real_epoch = train.train_one_epoch
    epochs = []

    def counted_epoch(training, loaders, run, progress):
        log.counting = True
        try:
            result = real_epoch(training, loaders, run, progress)
        finally:
            log.counting = False
        epochs.append(progress.step)
        return result

    monkeypatch.setattr(train, "train_one_epoch", counted_epoch)
    log.epochs = epochs
    return log


def test_a_training_step_reads_the_device_once_and_the_counts_once_an_epoch(host_reads, tmp_path):
    """One epoch of 6 steps of the default recipe (its EMA), in micro-batches of 2 with generated
    outliers: 6 reads for the stop vote, and 1 more (the training accuracy's count) for the epoch."""
    tree = make_tree(tmp_path / "data", n_train=8, n_val=1)
    code, _, err = call(train, train_argv(tree, tmp_path / "out", "--image-size", 32, "--micro-batch", 2,
                                          "--outliers", 5, "--val-ratio", 0.1))
    assert code == 0, err
    (steps,) = host_reads.epochs
    assert steps == 6
    voted = [sites for sites in host_reads.reads if BY_DESIGN & set(sites)]
    others = [sites[0] if sites else "torch" for sites in host_reads.reads if not BY_DESIGN & set(sites)]
    assert len(voted) == steps, voted
    assert len(others) <= 1, sorted(others)  # once per log line: the epoch's
    # the normalisation's mean and std are copied to the device once (or were already, in this process)
    assert len(host_reads.copies) <= 2, host_reads.copies
