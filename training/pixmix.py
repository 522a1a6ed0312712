"""PixMix (Hendrycks et al., "PixMix: Dreamlike Pictures Comprehensively Improve Safety Measures",
2022) with pictures the code makes itself (--pixmix ROUNDS, --pixmix-beta BETA).

Each training photo keeps its label and is mixed, before the step, with one generated picture and
its own mirror image, in a random number of rounds drawn from 0 to ROUNDS (the paper's k; it used up
to 4). Each round takes the picture or the mirror image (even odds) and mixes it in additively or
multiplicatively (even odds), with weights drawn from Beta distributions of strength BETA (the
paper's beta: 3 for CIFAR, 4 for ImageNet; larger keeps more of the photo), as the paper's code does:

    additive        a x (2 photo - 1) + b x (2 picture - 1), back to [0, 1]
    multiplicative  (2 photo)^a x (2 picture)^b / 2
    (a, b)          (Beta(BETA, 1), Beta(1, BETA)) or (1 + Beta(1, BETA), -Beta(1, BETA)), even odds

and clips to [0, 1] after every round. The paper mixes with fractals and feature visualisations and
mixes each photo with an augmented copy of itself; here the loader has augmented the photo already,
so its mirror image is that copy, and the pictures are, in equal shares, fractals (made below by
iterated function systems) and outliers.py's noise, textures and shapes: never a photo from
elsewhere.

Each step's draws come from a generator seeded by (seed, epoch, step, process), as the outliers', in
a stream of their own, so a resumed run mixes as an unbroken one does.
"""
import math
from dataclasses import dataclass

import torch

from training.outliers import DRAWN, hash_seed, rand

STREAM = 0x50_49_58_4D_49_58  # "PIXMIX": these draws differ from the outliers' of the same step
KINDS = ("fractals", *DRAWN)


@dataclass(frozen=True)
class PixMixer:
    """Mixes batches of normalised photos (mean and std: their normalisation) with generated pictures."""

    rounds: int
    beta: float
    mean: tuple
    std: tuple
    seed: int
    rank: int = 0

    def mix(self, images, epoch, step):
        """images (N x C x H x W, normalised) mixed, in the same memory format; an image drawn 0 rounds
        comes back as it was, bit for bit."""
        device = images.device
        generator = torch.Generator(device=device)
        generator.manual_seed(hash_seed(self.seed, epoch, step, self.rank) ^ STREAM)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        n, channels, size = len(images), images.shape[1], images.shape[-2:]
        rounds = torch.randint(self.rounds + 1, (n,), generator=generator, device=device)
        kinds = torch.randperm(n, generator=generator, device=device) % len(KINDS)
        mixing = (rounds > 0).nonzero().flatten()  # only these are mixed, and only their pictures made
        if not len(mixing):
            return images
        photos = (images[mixing].float() * std + mean).clamp(0, 1).contiguous()
        pictures = torch.empty_like(photos)
        for k, kind in enumerate(KINDS):
            where = (kinds[mixing] == k).nonzero().flatten()
            if len(where):
                draw = fractals if kind == "fractals" else DRAWN[kind]
                pictures[where] = draw(len(where), channels, size, generator, device)
        mixed, rounds = photos.clone(), rounds[mixing]
        m = len(mixing)
        for r in range(self.rounds):
            use_picture, multiplicative = (rand((2, m), generator, device) < 0.5).unbind(0)
            a, b = beta_weights(m, self.beta, generator, device)
            for op, chosen in ((add, ~multiplicative), (multiply, multiplicative)):
                rows = ((rounds > r) & chosen).nonzero().flatten()  # the images this round mixes this way
                if len(rows):
                    partner = torch.where(use_picture[rows].view(-1, 1, 1, 1), pictures[rows], photos[rows].flip(3))
                    mixed[rows] = op(mixed[rows], partner, a[rows], b[rows]).clamp_(0, 1)
        out = images.clone()
        out[mixing] = ((mixed - mean) / std).to(images.dtype)
        return out


def add(photo, partner, a, b):
    """The paper's additive mixing, in [-1, 1]: a x photo + b x partner."""
    return (a * (2 * photo - 1) + b * (2 * partner - 1) + 1) / 2


def multiply(photo, partner, a, b):
    """The paper's multiplicative (geometric) mixing, in [0, 2]: photo^a x partner^b (b may be negative:
    the partner is kept off 0)."""
    return (2 * photo) ** a * (2 * partner).clamp(min=1e-37) ** b / 2


def beta_weights(n, beta, generator, device):
    """The paper's get_ab for n images (each n x 1 x 1 x 1): (Beta(beta, 1), Beta(1, beta)) or
    (1 + Beta(1, beta), -Beta(1, beta)), even odds. Beta(c, 1) is U^(1/c) and Beta(1, c) is
    1 - U^(1/c): no sampler that ignores the generator is needed."""
    u = rand((3, n, 1, 1, 1), generator, device)
    high, low = u[0] ** (1 / beta), 1 - u[1] ** (1 / beta)  # Beta(beta, 1), Beta(1, beta)
    keep_photo = u[2] < 0.5
    return torch.where(keep_photo, high, 1 + low), torch.where(keep_photo, low, -low)


def fractals(n, channels, size, generator, device, walkers=512, steps=40, burn_in=8):
    """n fractals of iterated function systems, in [0, 1]: each the attractor of 2 to 4 random
    contractive affine maps of the plane (a rotation, two scales of 0.25 to 0.85 with random signs,
    another rotation, a shift), drawn by the chaos game: `walkers` points each apply a map chosen
    with odds in proportion to its area factor |det|, `steps` times; the points after the first
    `burn_in` steps lie on the attractor (the maps shrink distances by 0.85 or more a step). Each
    point takes the colour of the map that put it there, the brightness grows with the log of the
    points a pixel holds, on a dark or light background of a random colour. The attractor fills the
    picture, less a random margin."""
    h, w = size
    maps = 4
    count = 2 + torch.randint(maps - 1, (n,), generator=generator, device=device)  # 2 to 4 maps
    angles = rand((2, n, maps), generator, device) * 2 * math.pi
    scales = (0.25 + 0.6 * rand((n, maps, 2), generator, device)) * torch.where(
        rand((n, maps, 2), generator, device) < 0.5, -1.0, 1.0)
    linear = rotation(angles[0]) @ torch.diag_embed(scales) @ rotation(angles[1])  # n x maps x 2 x 2
    shift = rand((n, maps, 2), generator, device) * 2 - 1
    odds = linear.det().abs() * (torch.arange(maps, device=device) < count[:, None])
    coefficients = torch.cat([linear.flatten(2), shift], dim=2)  # n x maps x 6: a00 a01 a10 a11 b0 b1
    x, y = (rand((2, n, walkers), generator, device) * 2 - 1).unbind(0)
    picks = torch.multinomial(odds, walkers * steps, replacement=True, generator=generator).view(n, steps, walkers)
    visited = []
    for t in range(steps):
        c = torch.gather(coefficients, 1, picks[:, t, :, None].expand(n, walkers, 6)).unbind(2)
        x, y = c[0] * x + c[1] * y + c[4], c[2] * x + c[3] * y + c[5]
        if t >= burn_in:
            visited.append(torch.stack([x, y], dim=2))
    points, chosen = torch.cat(visited, 1), picks[:, burn_in:].reshape(n, -1)  # n x P x 2, n x P
    low, high = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)
    margin = 0.05 + 0.2 * rand((n, 1, 1), generator, device)
    unit = margin + (1 - 2 * margin) * (points - low) / (high - low).clamp(min=1e-6)
    pixel = (unit[..., 1] * (h - 1)).round().long() * w + (unit[..., 0] * (w - 1)).round().long()  # n x P
    colours = rand((n, maps, channels), generator, device)
    point_colours = torch.gather(colours, 1, chosen[..., None].expand(-1, -1, channels))  # n x P x C
    hits = torch.zeros((n, h * w), device=device).scatter_add_(1, pixel, torch.ones(pixel.shape, device=device))
    paint = torch.zeros((n, h * w, channels), device=device).scatter_add_(
        1, pixel[..., None].expand(-1, -1, channels), point_colours)
    colour = paint / hits.clamp(min=1)[..., None]
    brightness = (hits.log1p() / hits.amax(dim=1, keepdim=True).log1p().clamp(min=1e-6))[..., None]
    background = rand((n, 1, channels), generator, device) * torch.where(
        rand((n, 1, 1), generator, device) < 0.5, 0.3, 1.0)
    out = background * (1 - brightness) + colour * brightness  # n x HW x C
    return out.transpose(1, 2).reshape(n, channels, h, w).clamp(0, 1)


def rotation(angle):
    """2 x 2 rotation matrices of angles (any shape)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
