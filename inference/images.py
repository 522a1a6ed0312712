"""Reading images: the one image loader, finding image files, the evaluation preprocessing, and the
perceptual hash (near_hash) that finds copies of a picture, resized or recompressed.

Pillow and numpy only, no torch: predict.py with a .onnx file classifies photos without importing
torch, and the .pth path, validation and the demo page use these same functions, so every path
sees the same pixels. Every image becomes upright RGB, so grayscale, palette, RGBA and CMYK files
work like any photo.
"""
import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# Large JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps the shorter side at
# least this long: four times the paper's 224 px crop, the largest any recipe here uses, so even
# RandomResizedCrop's smallest crop (8% of the area) keeps more than 224 pixels of real detail.
# Photos smaller than this (all of the flower photos) are decoded as they are.
DECODE_MIN_SIDE = 4 * 224


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its images: resized to resize x resize (aspect not kept, as the classic
    script does), the centre crop x crop of that, scaled to [0, 1] and normalised with mean and std."""

    resize: int
    crop: int
    mean: tuple = MEAN
    std: tuple = STD


def _draft(img, min_side):
    """Ask a JPEG for its reduced DCT scale before decoding (sets img.size; decodes nothing)."""
    if img.format == "JPEG" and min_side:
        img.draft("RGB", (min_side, min_side))  # only ever shrinks by a power of two


def load_image(path, min_side=DECODE_MIN_SIDE):
    """Decode one file (a path or a binary file object) to an upright RGB PIL image; raises
    OSError/ValueError (Pillow's errors) for unreadable files.

    Upright: a camera that stores a photo sideways tags it with an EXIF orientation, which photo
    viewers apply; so does this, before anything else sees the pixels.
    """
    with Image.open(path) as img:
        _draft(img, min_side)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit grey: Pillow's convert would clip at 255
            deep = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray(np.clip(deep // 257 if deep.max() > 255 else deep, 0, 255).astype(np.uint8))
        return img.convert("RGB")


# The first bytes of every format in IMAGE_EXTENSIONS (WebP: RIFF, then WEBP at byte 8).
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
              b"RIFF", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7")


def unreadable(path):
    """Why this file cannot be an image (a reason), or None: the cheap check made of every file at
    start-up. It reads 16 bytes; only a file that starts like none of the formats above has its
    header parsed by Pillow (which reads more formats than their names say). A file that passes can
    still fail later, when it is decoded (a truncated photo, say)."""
    try:  # os.open and os.read: half the cost of open() and its buffered file object
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    if not head:
        return "an empty file"
    if head.startswith(SIGNATURES) and (not head.startswith(b"RIFF") or head[8:12] == b"WEBP"):
        return None
    try:
        with Image.open(path):
            return None
    except Exception as e:  # any failure to parse the header means the same here: not an image
        return f"{type(e).__name__}: {e}"


def decoded_size(path, min_side=DECODE_MIN_SIDE):
    """(width, height) that load_image will return, read from the header without decoding."""
    with Image.open(path) as img:
        _draft(img, min_side)
        return img.size


def find_image_files(folder, within=None):
    """Every image file under folder, sorted. Links to files and folders are followed, but no
    folder is entered twice (a link to a parent folder would otherwise loop until the path length
    runs out). With within, the data folder that holds this class folder, a link that leads
    elsewhere inside it (into another class's folder, the data folder itself or above it) is not
    followed either: no photo is counted twice, or under the wrong class."""
    files, seen = [], set()
    real_folder = os.path.realpath(folder)
    real_within = os.path.realpath(within) if within else None
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        elsewhere = (real_within is not None and not inside(real, real_folder)
                     and (inside(real, real_within) or inside(real_within, real)))
        if real in seen or elsewhere:
            dirnames[:] = []
            continue
        seen.add(real)
        files.extend(os.path.join(dirpath, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(files)


def inside(path, folder):
    """Whether path is folder or lies under it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def resize_and_crop(image, preprocessing):
    """The evaluation preprocessing of one PIL image: uint8 crop x crop x 3 (torchvision's
    Resize((s, s)) and CenterCrop on a PIL image, pixel for pixel: a test compares them)."""
    size, crop = preprocessing.resize, preprocessing.crop
    image = image.resize((size, size), Image.BILINEAR)
    if crop != size:
        top = left = int(round((size - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
    return np.array(image, dtype=np.uint8)


def normalize(pixels, preprocessing):
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1], normalised: what the model's input is."""
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    x /= np.float32(255)
    x -= np.asarray(preprocessing.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(preprocessing.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(x)


def default_workers(device_type, batch_size, cached=False, items=None):
    """How many workers decode images beside the model (loader processes in training, threads in
    predict.py).

    On a CPU the model's own threads already use every core: workers would only take turns with
    them, so cached images (a crop and a flip, about 1 ms each) are prepared in the main process,
    and JPEG decoding from disk gets one worker that overlaps it with the compute (none for a
    single image). On CUDA the CPU is free for decoding: min(cpu count, batch size, 8), as the
    classic scripts do.
    """
    cpus = os.cpu_count() or 1
    if device_type == "cuda":
        return min(cpus, batch_size if batch_size > 1 else 0, 8)
    if cached or (items is not None and items <= 1):
        return 0
    return min(1, cpus - 1)


# ---------------------------------------------------------------------------------------------
# Near copies: a perceptual hash of each image, and the pairs of hashes within a few bits
# ---------------------------------------------------------------------------------------------
# Measured on the 2,939 flower photos (data_set/README.md): pairs within 8 bits are 14 times the
# same picture (recompressed, resized, cropped a little, recoloured) and twice two different photos
# of a dandelion; 10 bits adds 12 pairs, 11 of them different photos. A copy resized to 50% or
# saved again at JPEG quality 60 is within 6 bits of its original.
NEAR_COPY_BITS = 8
# JPEGs are decoded at the smallest DCT scale that keeps 64 px on each side: twice the thumbnail
# the hash is computed on, so the thumbnail is still resampled from real pixels. The hash of a
# photo decoded whole is within 2 bits of this one for 97% of the flower photos (at most 6).
HASH_DECODE_SIDE = 64
_THUMB = 32
_DCT_ROWS = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(_THUMB) + 1) / (2 * _THUMB))  # DCT-II, 8 x 32
_BIT_VALUES = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))


def near_hash(image):
    """The 64-bit perceptual hash (pHash) of a PIL image, as an int: the signs, relative to their
    median, of the 8 x 8 lowest frequencies of the DCT of a 32 x 32 greyscale thumbnail (what the
    imagehash package's phash computes). The same picture resized, recompressed or decoded at a
    reduced scale gives a hash a few bits away (hash_distance); different photos are about 32 bits
    apart. Any size and mode of image works; the cost is the thumbnail's (about 0.2 ms)."""
    grey = np.asarray(image.convert("L").resize((_THUMB, _THUMB), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT_ROWS @ grey @ _DCT_ROWS.T
    return int(_BIT_VALUES[low.ravel() > np.median(low)].sum())


def reduced_for_hash(image):
    """image shrunk by the largest power of two, up to 8, that keeps its shorter side at least
    HASH_DECODE_SIDE px (Image.reduce: a box filter), as decoding a JPEG at that reduced DCT scale
    shrinks it. near_hash of the result is within 2 bits of what data_set.check computes of the file
    for 500 flower photos (near_hash of the whole image: within 6), and costs a third as much (0.15
    instead of 0.4 ms a photo); a copy resized to 50% and saved at JPEG quality 60 stays within 6 bits."""
    factor = 1
    while factor < 8 and min(image.size) // (2 * factor) >= HASH_DECODE_SIDE:
        factor *= 2
    return image.reduce(factor) if factor > 1 else image


def hash_distance(a, b):
    """The number of bits in which two near_hash values differ."""
    return (a ^ b).bit_count()


# ---------------------------------------------------------------------------------------------
# Near pairs: a multi-index search over bands of the hashes
# ---------------------------------------------------------------------------------------------
def _band_widths(bands):
    edges = [round(64 * i / bands) for i in range(bands + 1)]
    return [(lo, hi - lo) for lo, hi in itertools.pairwise(edges)]


def _flips(width, radius):
    """Every width-bit mask with at most radius bits set."""
    return [sum(1 << b for b in bits) for r in range(radius + 1) for bits in itertools.combinations(range(width), r)]


# Measured with 117,336 distinct hashes (the flower photos' quarters, turned and mirrored) at
# threshold 8: a lookup took about 8 times as long as checking one candidate pair.
LOOKUP_COST = 8


def search_plan(count, threshold):
    """(bands, radius): split the 64 bits into bands and look up, in each band, every key within
    radius bits of a hash's own. Two hashes within threshold bits are within threshold // bands bits
    in at least one band (pigeonhole), so no pair is missed. More bands mean fewer lookups but
    fuller buckets; this takes the split with the least work, estimated with the keys spread
    uniformly and a lookup (a binary search) costing LOOKUP_COST checked candidates."""
    count = max(count, 2)  # with no pair to find, every plan costs nothing: take the one for two

    def work(bands):
        radius = threshold // bands
        return sum(count * sum(math.comb(width, r) for r in range(radius + 1)) * (LOOKUP_COST + count / 2 ** width)
                   for _, width in _band_widths(bands))
    bands = min(range(1, min(threshold + 1, 64) + 1), key=work)
    return bands, threshold // bands


def near_pairs(hashes, threshold, block=1 << 22):
    """(i, j, distance) arrays, i < j, of every pair of hashes (distinct uint64 values) within
    threshold bits of each other. The candidates are the pairs that share a band key up to the
    radius of search_plan; they are checked in blocks of at most about block pairs."""
    h = np.asarray(hashes, dtype=np.uint64)
    found = [np.empty((0, 3), dtype=np.int64)]
    if len(h) < 2:
        return found[0][:, 0], found[0][:, 1], found[0][:, 2]
    bands, radius = search_plan(len(h), threshold)
    for lo, width in _band_widths(bands):
        keys = (h >> np.uint64(lo)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        bucket_keys, starts, sizes = np.unique(keys[order], return_index=True, return_counts=True)
        for flip in _flips(width, radius):
            probe = keys ^ np.uint64(flip)
            at = np.minimum(np.searchsorted(bucket_keys, probe), len(bucket_keys) - 1)
            hit = np.flatnonzero(bucket_keys[at] == probe)
            counts = sizes[at[hit]]
            ends = np.cumsum(counts)
            cuts = np.searchsorted(ends, np.arange(block, int(ends[-1]) if len(ends) else 0, block))
            for part in np.split(np.arange(len(hit)), cuts):
                queries, n = hit[part], counts[part]
                first = np.repeat(starts[at[queries]] - (np.cumsum(n) - n), n)
                i = np.repeat(queries, n)
                j = order[first + np.arange(int(n.sum()))]
                ahead = i < j
                i, j = i[ahead], j[ahead]
                distance = np.bitwise_count(h[i] ^ h[j]).astype(np.int64)
                close = distance <= threshold
                found.append(np.stack([i[close], j[close], distance[close]], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0)  # a pair close in several bands is found in each
    return pairs[:, 0], pairs[:, 1], pairs[:, 2]

