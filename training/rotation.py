"""The rotation head's task (--rotation-weight, --rotation-share): which quarter turn a photo was given.

Hendrycks et al. ("Using Self-Supervised Learning Can Improve Model Robustness and Uncertainty",
2019) train a head to tell the four rotations of every image apart, which costs four forward passes
of the batch. Here a share of each batch (--rotation-share, a quarter by default) is copied and
turned by 90, 180 or 270 degrees, and those copies run beside the batch: the head learns the turn of
the copies and "upright" (0) on the photos themselves, each of the four turns weighing the same.
The class heads never see the copies.

Which photos are turned, and by how much, comes from a generator seeded by (seed, epoch, step,
process), in a stream of its own: a resumed run turns the same ones.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import TURNS
from training.outliers import hash_seed

STREAM = 0x52_4F_54_41_54_45  # "ROTATE": these draws differ from the outliers' and the mixing's


@dataclass
class Rotated:
    """The turned copies of some photos of a batch: images (K x C x H x W), turns (K: quarter turns,
    1 to 3, torch.rot90's k) and picks (K: the index in the batch of the photo each was copied from)."""

    images: torch.Tensor
    turns: torch.Tensor
    picks: torch.Tensor


@dataclass(frozen=True)
class Rotator:
    """Turns `share` of each batch (at least one photo)."""

    share: float
    seed: int
    rank: int = 0

    def make(self, images, epoch, step):
        """The Rotated copies of a batch of square images, in its memory format."""
        n, device = len(images), images.device
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"quarter turns keep the shape of square images only, got {tuple(images.shape[-2:])}")
        generator = torch.Generator(device=device)
        generator.manual_seed(hash_seed(self.seed, epoch, step, self.rank) ^ STREAM)
        count = max(1, round(self.share * n))
        picks = torch.randperm(n, generator=generator, device=device)[:count]
        turns = torch.randint(1, len(TURNS), (count,), generator=generator, device=device)
        out = torch.empty((count, *images.shape[1:]), device=device, dtype=images.dtype)
        for k in TURNS[1:]:
            where = (turns == k).nonzero().flatten()
            if len(where):
                out[where] = torch.rot90(images[picks[where]], k, dims=(2, 3))
        if images.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return Rotated(out, turns, picks)


def split_outputs(outputs, rotated_rows):
    """(the class heads' outputs (logits, aux2, aux1) without the last rotated_rows rows, the rotation
    head's logits or None) of a training forward pass: the model returns a fourth output with the
    rotation head, and the turned copies run last."""
    if len(outputs) == 3:
        return outputs, None
    kept = len(outputs[0]) - rotated_rows
    return tuple(o[:kept] for o in outputs[:3]), outputs[3]


def rotation_loss(logits, photos, turns=None):
    """The rotation head's cross-entropy: its logits' first `photos` rows are the photos (turn 0),
    its last len(turns) rows the turned copies (None: a micro-batch without any). The photos' mean and
    the copies' mean weigh 1 to 3, as the four turns do in the paper's loss, whatever share of the
    batch is turned."""
    logits = logits.float()
    upright = F.cross_entropy(logits[:photos], torch.zeros(photos, dtype=torch.long, device=logits.device))
    turned = 0.0 if turns is None else F.cross_entropy(logits[len(logits) - len(turns):], turns)
    return (upright + (len(TURNS) - 1) * turned) / len(TURNS)
