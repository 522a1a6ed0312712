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
               (a batch of fewer than three photos gets the other four kinds only)

Every image is drawn from a generator seeded by (seed, epoch, step, process), so a resumed run makes
the same outliers as an unbroken one.

--outlier-loss energy trains margins on the energy instead (Liu et al., "Energy-based Out-of-
distribution Detection", 2020): energy_margin_loss below.
"""
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.data import normalization

KINDS = ("noise", "textures", "shapes", "shuffled", "blended")
BLENDED_PHOTOS = 3  # the photos a blended outlier averages: a smaller batch gets none


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
        # a batch of fewer photos than a blend takes (an epoch's last, say) gets the other kinds instead:
        # a blend of one photo with itself would be that photo, trained towards "none of my classes"
        kinds_made = KINDS if len(images) >= BLENDED_PHOTOS else tuple(k for k in KINDS if k != "blended")
        mean, std = normalization(tuple(self.mean), tuple(self.std), images.device)
        size, parts = images.shape[-2:], []
        for k, kind in enumerate(kinds_made):
            n = len(range(k, self.count, len(kinds_made)))  # equal shares, the first kinds one more
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


def energy(logits):
    """Each row's free energy, -log-sum-exp of its logits: low for what the model knows."""
    return -torch.logsumexp(logits, dim=1)


def energy_margin_loss(known_logits, outlier_logits, margins, shares=(1.0, 1.0)):
    """Liu et al.'s energy-bounded loss: the mean squared hinge of the photos' energies above m_in
    plus that of the outliers' energies below m_out, margins = (m_in, m_out), each mean weighed by its
    share (a micro-batch's share of the step's photos and of its outliers; no rows: no term). 0 once
    every photo's energy is at most m_in and every outlier's at least m_out. The class loss is blind to
    adding one number to all of a photo's logits, so the margins set where energies lie, not what is learned."""
    m_in, m_out = margins
    terms = (F.relu(energy(known_logits) - m_in), F.relu(m_out - energy(outlier_logits)))
    return sum(share * (hinge ** 2).mean() for share, hinge in zip(shares, terms) if len(hinge))


def outlier_loss(outputs, known, aux_weight, margins=None, shares=(1.0, 1.0)):
    """The outliers' part of a step's loss, the heads weighed as in the paper's loss: outputs are the
    chunk's (logits, aux2, aux1), whose rows after the first `known` are the outliers'. margins:
    (m_in, m_out) for the energy-margin loss (--outlier-loss energy), None for the uniform one.
    shares: the chunk's share of the step's photos and of its outliers, so that a step's loss is the
    same however it is split into micro-batches."""
    if margins is not None:
        heads = [(o.float()[:known], o.float()[known:]) for o in outputs]
        main, aux2, aux1 = (energy_margin_loss(photos, outliers, margins, shares) for photos, outliers in heads)
        return main + aux_weight * (aux1 + aux2)
    logits, aux2, aux1 = (o.float()[known:] for o in outputs)
    if not len(logits):  # this micro-batch got none of the step's outliers
        return logits.new_zeros(())
    return shares[1] * (uniform_loss(logits) + aux_weight * (uniform_loss(aux1) + uniform_loss(aux2)))


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


def blended(images, n, generator, parts=BLENDED_PHOTOS):
    """n averages of `parts` different photos of the batch, each weighing 1 / parts +- 0.1: no one photo shows."""
    if len(images) < parts:
        raise ValueError(f"a blend of {parts} different photos needs a batch of at least {parts}, got {len(images)}")
    picks = rand((n, len(images)), generator, images.device).argsort(dim=1)[:, :parts]
    weights = 1 / parts + 0.2 * (rand((n, parts), generator, images.device) - 0.5)
    weights = (weights / weights.sum(dim=1, keepdim=True)).view(n, parts, 1, 1, 1)
    return (images[picks] * weights).sum(dim=1)


DRAWN = {"noise": noise, "textures": textures, "shapes": shapes}  # drawn in [0, 1], normalised by make()
FROM_PHOTOS = {"shuffled": shuffled, "blended": blended}  # made from the batch's photos, already normalised
