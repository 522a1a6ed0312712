"""Outlier exposure (Hendrycks et al., "Deep Anomaly Detection with Outlier Exposure", 2019) with
outliers the code makes itself, so the repository depends on no outlier dataset.

Each step gets --outliers generated images beside its photos, and a loss that pushes the model's
answers on them towards uniform probabilities: the model learns that a low top probability means
"none of my classes", which the "not sure" threshold then reads. Five kinds, in equal shares:

    noise      coloured noise at a random grain, from single pixels to a few blobs
    textures   sums of coloured sine gratings, stripes and checkerboards
    shapes     ellipses and rectangles of random colours on a random background
    shuffled   a photo of the batch cut into an 8 x 8 grid and its tiles shuffled
    blended    three different photos of the batch averaged, none weighing much more than a third

Every image is drawn from a generator seeded by (seed, epoch, step, process), so a resumed run makes
the same outliers as an unbroken one.
"""
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.data import normalization

KINDS = ("noise", "textures", "shapes", "shuffled", "blended")


@dataclass(frozen=True)
class OutlierMaker:
    """Makes `count` outliers for a batch of normalised photos; mean and std normalise the drawn ones."""

    count: int
    mean: tuple
    std: tuple
    seed: int
    rank: int = 0

    def make(self, images, epoch, step):
        """count outliers shaped and normalised like images (N x C x H x W, in the same memory format).

        Nothing here reads the device: each kind's share is known beforehand, every draw stays on
        images' device, and the kinds are mixed by a permutation drawn there."""
        generator = torch.Generator(device=images.device)
        generator.manual_seed(hash_seed(self.seed, epoch, step, self.rank))
        mean, std = normalization(tuple(self.mean), tuple(self.std), images.device)
        size, parts = images.shape[-2:], []
        for k, kind in enumerate(KINDS):
            n = len(range(k, self.count, len(KINDS)))  # equal shares, the first kinds one more
            if not n:
                continue
            if kind in FROM_PHOTOS:
                parts.append(FROM_PHOTOS[kind](images, n, generator))
            else:
                parts.append((DRAWN[kind](n, images.shape[1], size, generator, images.device) - mean) / std)
        # mixed, so that each micro-batch of a step gets some of every kind
        out = torch.cat(parts).to(images.dtype)[torch.randperm(self.count, generator=generator, device=images.device)]
        if images.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def hash_seed(seed, epoch, step, rank):
    """One 63-bit seed per (seed, epoch, step, process), the same in every session of a run."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_000_003 + rank) % (2 ** 63)


def uniform_loss(logits):
    """Cross-entropy between softmax(logits) and the uniform distribution over the classes, averaged
    over the images: its minimum, log(classes) less the entropy term, is reached at equal logits."""
    return -F.log_softmax(logits, dim=1).mean()


def outlier_loss(outputs, known, aux_weight):
    """The outliers' part of a step's loss, the heads weighed as in the paper's loss: outputs are the
    chunk's (logits, aux2, aux1), whose rows after the first `known` are the outliers'."""
    logits, aux2, aux1 = (o.float()[known:] for o in outputs)
    return uniform_loss(logits) + aux_weight * (uniform_loss(aux1) + uniform_loss(aux2))


def rand(shape, generator, device):
    return torch.rand(shape, generator=generator, device=device)


def noise(n, channels, size, generator, device):
    """Uniform colour noise on a grid of 2 to size cells a side (log-uniform), upsampled smoothly: grains from
    single pixels to a few blobs, in [0, 1]."""
    # the grid sizes shape tensors, so the host must know them: drawn by Python's generator seeded as
    # this one was, as reading a GPU's draws would wait for the GPU
    host = random.Random(generator.initial_seed())
    out = torch.empty((n, channels, *size), device=device)
    for i in range(n):
        cells = max(2, min(int(2 ** (host.random() * math.log2(max(size)))), max(size)))
        grid = rand((1, channels, cells, cells), generator, device)
        out[i] = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0]
    return out


def textures(n, channels, size, generator, device, most_waves=3):
    """Sums of 1 to 3 sine gratings of random frequency, angle and phase, each in two random colours;
    half of them squared into stripes and checkerboards, in [0, 1]."""
    h, w = size
    y = torch.linspace(-1, 1, h, device=device).view(1, h, 1)
    x = torch.linspace(-1, 1, w, device=device).view(1, 1, w)
    out = torch.zeros((n, channels, h, w), device=device)
    for i in range(n):
        waves = 1 + (rand((), generator, device) * most_waves).floor()  # 1 to 3, left on the device
        pattern = torch.zeros((1, h, w), device=device)
        for k in range(most_waves):
            angle, phase, frequency = rand((3,), generator, device)  # [0, pi), [0, 2 pi), 2 to 32
            angle, phase, frequency = math.pi * angle, 2 * math.pi * phase, 2 + 30 * frequency
            wave = torch.sin(frequency * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
            pattern = pattern + wave * (k < waves)
        pattern = pattern / waves
        pattern = torch.where(rand((), generator, device) < 0.5, torch.sign(pattern), pattern)
        low, high = rand((2, channels, 1, 1), generator, device)
        out[i] = low + (high - low) * (pattern + 1) / 2
    return out


def shapes(n, channels, size, generator, device, count=6):
    """count ellipses and rectangles of random colours, sizes and places on a random background, in [0, 1]."""
    h, w = size
    y = torch.linspace(0, 1, h, device=device).view(h, 1)
    x = torch.linspace(0, 1, w, device=device).view(1, w)
    out = rand((n, channels, 1, 1), generator, device).expand(n, channels, h, w).clone()
    for i in range(n):
        for _ in range(count):
            cx, cy, rx, ry, kind = rand((5,), generator, device)
            rx, ry = 0.05 + 0.3 * rx, 0.05 + 0.3 * ry
            ellipse = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
            rectangle = ((x - cx).abs() < rx) & ((y - cy).abs() < ry)
            colour = rand((channels, 1, 1), generator, device)
            out[i] = torch.where(torch.where(kind < 0.5, ellipse, rectangle), colour, out[i])
    return out


def shuffled(images, n, generator):
    """n photos of the batch, each cut into an 8 x 8 grid of tiles put back in random order: the
    photo's colours and local texture without its shape (tiles of 16 px at 128; a 4 x 4 grid keeps
    whole flowers). Sizes not divisible by the grid are resized to the nearest multiple and back."""
    h, w = images.shape[-2:]
    picks = images[torch.randint(len(images), (n,), generator=generator, device=images.device)]
    out = torch.empty((n, *images.shape[1:]), device=images.device, dtype=images.dtype)
    for i in range(n):
        grid = 8
        th, tw = max(1, round(h / grid)), max(1, round(w / grid))
        photo = picks[i:i + 1]
        if (th * grid, tw * grid) != (h, w):
            photo = F.interpolate(photo, size=(th * grid, tw * grid), mode="bilinear", align_corners=False)
        c = photo.shape[1]
        tiles = photo.reshape(c, grid, th, grid, tw).permute(1, 3, 0, 2, 4).reshape(grid * grid, c, th, tw)
        tiles = tiles[torch.randperm(grid * grid, generator=generator, device=images.device)]
        photo = tiles.reshape(grid, grid, c, th, tw).permute(2, 0, 3, 1, 4).reshape(1, c, th * grid, tw * grid)
        if photo.shape[-2:] != (h, w):
            photo = F.interpolate(photo, size=(h, w), mode="bilinear", align_corners=False)
        out[i] = photo[0]
    return out


def blended(images, n, generator, parts=3):
    """n averages of `parts` different photos of the batch, each weighing 1 / parts +- 0.1: no one photo shows."""
    order = rand((n, len(images)), generator, images.device).argsort(dim=1)
    picks = order[:, torch.arange(parts, device=images.device) % len(images)]  # the first parts; repeated if fewer
    weights = 1 / parts + 0.2 * (rand((n, parts), generator, images.device) - 0.5)
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(n, parts, 1, 1, 1)
    return (images[picks] * weights).sum(dim=1)


DRAWN = {"noise": noise, "textures": textures, "shapes": shapes}  # drawn in [0, 1], normalised by make()
FROM_PHOTOS = {"shuffled": shuffled, "blended": blended}  # made from the batch's photos, already normalised
