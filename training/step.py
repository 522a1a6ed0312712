"""The parts of a training step around the lesson's five lines (forward, loss, backward, step):
micro-batches, DDP's gradient sync and the per-step vote across processes (a plumbing.stopping.StopRequest's check)."""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from plumbing import distributed
from plumbing.options import UserError
from training import data


@dataclass
class EpochResult:
    loss: float
    accuracy: Optional[float]  # None with MixUp/CutMix: the targets are then mixtures, not classes
    images_per_s: float
    stopped: bool = False  # a stop was requested: the epoch ended early


def train_mode(model, freeze_layers):
    """Training mode, except that frozen layers (--freeze-layers) keep their BatchNorm statistics too."""
    model.train()
    if freeze_layers:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()


@dataclass
class Chunk:
    """One micro-batch of a step: its images, (soft) targets and class labels, its share of the batch,
    its part of the step's generated outliers (--outliers; None without) with their share of them,
    and its turned copies (--rotation-weight: rotated, and their quarter turns; None without). A
    chunk's photo loss is weighed by share and its outlier loss by outlier_share, so both add up to
    their means over the whole step however it is split."""

    images: object
    targets: object
    labels: object
    share: float
    last: bool
    outliers: object = None
    outlier_share: float = 0.0
    rotated: object = None
    turns: object = None

    @property
    def inputs(self):
        """What the model runs on: the images, then the outliers, then the turned copies."""
        parts = [t for t in (self.images, self.outliers, self.rotated) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def micro_batches(images, targets, labels, size, outliers=None, rotated=None):
    """The step's chunks of at most size images (--micro-batch; 0: the whole batch as one chunk),
    the outliers and the turned copies (a rotation.Rotated) shared out among them in proportion."""
    size = size if 0 < size < len(images) else len(images)
    parts = list(zip(images.split(size), targets.split(size), labels.split(size)))
    shares = [None] * len(parts)
    if outliers is not None:
        n, total = len(outliers), len(images)  # chunk i gets the outliers its images' share rounds to
        bounds = [(n * end + total // 2) // total for end in range(0, total, size)]
        bounds.append(n)
        shares = [outliers[a:b] if b > a else None for a, b in zip(bounds, bounds[1:])]
    chunks = [Chunk(x, y, hard, len(x) / len(images), i == len(parts) - 1, extra,
                    0.0 if extra is None else len(extra) / len(outliers))
              for i, ((x, y, hard), extra) in enumerate(zip(parts, shares))]
    if rotated is not None:
        n, total = len(rotated.turns), len(images)  # shared out as the outliers are
        bounds = [(n * end + total // 2) // total for end in range(0, total, size)] + [n]
        for chunk, a, b in zip(chunks, bounds, bounds[1:]):
            if b > a:
                chunk.rotated, chunk.turns = rotated.images[a:b], rotated.turns[a:b]
    return chunks


def gradient_sync(forward, chunk):
    """DDP all-reduces gradients on a step's last chunk only: the chunks before it run under no_sync."""
    no_sync = getattr(forward, "no_sync", None)
    return contextlib.nullcontext() if chunk.last or no_sync is None else no_sync()


class TrainingError(UserError):
    """A run that cannot go on (the loss diverged, an output that cannot be written): the message says what to do."""

    exit_code = 1


def vote(stop, loader, device, step_loss, bad_images, where):
    """One all-reduce per step tells every process about a diverged loss, a stop request, or an
    unreadable image when --bad-images error asks to stop at the first. Raises for the last two;
    returns (the step's loss as a number, whether to stop after this step).

    step_loss: the step's loss, a tensor on the device. Reading it is the step's one wait for the
    device (a GPU's queued kernels), by design: every process must learn at this step that a loss
    diverged. The other counts of a step stay on the device (train.py, count_correct)."""
    step_loss = step_loss.item()
    found = bad_images == "error" and loader.dataset.cache.found_bad
    diverged, stopping, unreadable = stop.check(device, not math.isfinite(step_loss), found)
    if unreadable:
        raise (data.unreadable_error(loader.dataset.unreadable()[0]) if found else distributed.PeerFailed())
    if diverged:
        loss = step_loss if not math.isfinite(step_loss) else "nan or inf in another process"
        raise TrainingError(f"the loss became {loss} at {where}: training diverged; lower --lr "
                            "(best.pth was not touched)")
    return step_loss, stopping
