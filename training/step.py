"""The parts of a training step around the lesson's lines in train.py's train_one_epoch (forward,
the three losses, backward, step): the batches as the model takes them, cut into micro-batches
(chunks), the losses that the options add, the per-step vote across processes (a
plumbing.stopping.StopRequest's check), the EMA's update and the epoch's counts."""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from plumbing import device as dev
from plumbing import distributed
from plumbing.options import UserError
from training import data, recipe
from training.outliers import outlier_loss
from training.rotation import rotation_loss, split_outputs


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
    step_images: int = 0  # the photos of the whole step (the batch), in every chunk

    @property
    def inputs(self):
        """What the model runs on: the images, then the outliers, then the turned copies."""
        parts = [t for t in (self.images, self.outliers, self.rotated) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def photo_outputs(self, outputs):
        """The class heads' outputs (logits, aux2, aux1) for the chunk's photos, in fp32: a training
        forward pass's outputs without the outliers' and turned copies' rows."""
        heads, _ = split_outputs(outputs, 0 if self.turns is None else len(self.turns))
        return tuple(o.float()[:len(self.images)] for o in heads)


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
                    0.0 if extra is None else len(extra) / len(outliers), step_images=len(images))
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


@contextlib.contextmanager
def forward_context(forward, chunk, run):
    """Where a chunk's forward pass runs: DDP's gradient sync (gradient_sync) and the run's autocast."""
    with gradient_sync(forward, chunk), dev.autocast(run.device, run.placement.amp_dtype):
        yield


def chunks(batches, training, run, progress):
    """Every step's chunks: each batch of the loader (uint8 photos, class labels, indices) moved to
    the device and normalised, given what the options add (--outliers' generated pictures, --pixmix's
    mixing, MixUp/CutMix's soft targets, --rotation-weight's turned copies), and cut into
    --micro-batch chunks, of which a step's last has last=True. Training batches are all valid: an
    unreadable image was replaced by the loader."""
    mean, std = run.record.preprocessing.mean, run.record.preprocessing.std
    for images, labels, _ in batches:
        images = data.normalize_batch(images.to(run.device, non_blocking=True), mean, std,
                                      channels_last=run.args.channels_last)
        labels = targets = labels.to(run.device, non_blocking=True)
        epoch, at = progress.epoch, progress.step  # what seeds the step's generated pictures and turns
        outliers = training.outliers.make(images, epoch, at) if training.outliers else None
        if training.pixmix is not None:  # mixed with generated pictures, labels kept
            images = training.pixmix.mix(images, epoch, at)
        if training.mix is not None:
            images, targets = training.mix(images, labels)  # soft targets, for the aux heads too
        rotated = training.rotator.make(images, epoch, at) if training.rotator else None
        yield from micro_batches(images, targets, labels, run.args.micro_batch, outliers, rotated)


def weigh(loss, outputs, chunk, args):
    """The chunk's part of the step's loss: the paper's loss plus --rotation-weight x the rotation
    head's, times the chunk's share of the batch (chunks add up to the mean over the batch), plus
    --outlier-weight x the outliers' loss (--outliers: uniform answers or energy margins), each part
    weighed by the chunk's share of the photos and of the outliers: the step's mean, however it is split."""
    heads, turn_logits = split_outputs(outputs, 0 if chunk.turns is None else len(chunk.turns))
    if turn_logits is not None:  # the rotation head: which quarter turn each copy was given
        loss = loss + args.rotation_weight * rotation_loss(turn_logits, len(chunk.images), chunk.turns)
    loss = loss * chunk.share
    if args.outliers:
        margins = tuple(args.energy_margins) if args.outlier_loss == "energy" else None
        loss = loss + args.outlier_weight * outlier_loss(heads, len(chunk.images), args.aux_weight, margins,
                                                         (chunk.share, chunk.outlier_share))
    return loss


def average_weights(state, args):
    """The EMA of the weights (--model-ema) after a step: recipe.update_ema; nothing with --no-model-ema."""
    if state.ema is not None:
        recipe.update_ema(state.ema, state.model, args.model_ema_decay)


@dataclass
class EpochMeter:
    """What an epoch counts as it goes. The right answers (none with MixUp/CutMix, whose targets are
    mixtures) and the step's loss stay on the device and are read only when needed (the stop vote, a
    save, the epoch's end): a read of a GPU's tensor waits for every queued kernel."""

    device: torch.device
    counts_correct: bool
    correct: torch.Tensor = None
    step_loss: torch.Tensor = None
    images: int = 0  # the photos this session trained on this epoch: the speed's count
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step_loss = torch.zeros((), device=self.device)

    def add(self, loss, logits, chunk):
        self.step_loss += loss.detach()
        self.images += len(chunk.images)
        if self.counts_correct:
            self.correct += (logits.argmax(1) == chunk.labels).sum()

    def take_step_loss(self):
        """The step's loss so far, on the device; the next step's starts at zero."""
        loss, self.step_loss = self.step_loss, torch.zeros((), device=self.device)
        return loss

    def count_into(self, progress):
        """Move the right answers counted on the device into progress (one read of the device)."""
        progress.correct += int(self.correct)
        self.correct.zero_()

    def stopped(self, progress):
        """The EpochResult of an epoch ended early by a stop request, its right answers counted."""
        self.count_into(progress)
        return EpochResult(float("nan"), None, 0.0, stopped=True)

    def result(self, progress):
        """The epoch's EpochResult, summed over every process."""
        self.count_into(progress)
        loss_sum, seen, timed, correct = distributed.all_reduce_sum(
            [progress.loss_sum, progress.seen, self.images, progress.correct], self.device)
        accuracy = correct / max(seen, 1) if self.counts_correct else None
        return EpochResult(loss_sum / max(seen, 1), accuracy, timed / max(time.perf_counter() - self.started, 1e-9))


class TrainingError(UserError):
    """A run that cannot go on (the loss diverged, an output that cannot be written): the message says what to do."""

    exit_code = 1


def vote(stop, loader, run, step_loss, progress):
    """One all-reduce per step tells every process about a diverged loss, a stop request, or an
    unreadable image when --bad-images error asks to stop at the first. Raises for the last two;
    returns (the step's loss as a number, whether to stop after this step).

    step_loss: the step's loss, a tensor on the device. Reading it is the step's one wait for the
    device (a GPU's queued kernels), by design: every process must learn at this step that a loss
    diverged. The other counts of a step stay on the device (EpochMeter)."""
    step_loss = step_loss.item()
    found = run.args.bad_images == "error" and loader.dataset.cache.found_bad
    diverged, stopping, unreadable = stop.check(run.device, not math.isfinite(step_loss), found)
    if unreadable:
        raise (data.unreadable_error(loader.dataset.unreadable()[0]) if found else distributed.PeerFailed())
    if diverged:
        loss = step_loss if not math.isfinite(step_loss) else "nan or inf in another process"
        raise TrainingError(f"the loss became {loss} at epoch {progress.epoch + 1}, step {progress.step + 1}: "
                            "training diverged; lower --lr (best.pth was not touched)")
    return step_loss, stopping
