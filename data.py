"""Images in, batches out: the transforms, the image-folder dataset, the cache and the flower download.

Every image is decoded with Pillow and converted to RGB, so grayscale, palette, RGBA and CMYK files
train like any photo. The per-image transforms end in uint8 tensors; scaling to [0, 1] and the
normalisation happen once per batch on the training device (``normalize_batch``), which is the same
arithmetic as torchvision's ToTensor + Normalize, a quarter of the bytes to copy, and one pass.
"""
import hashlib
import os
import random
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2

IMAGE_SIZE = 224
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Large JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps the shorter side at
# least this long: four times the crop size, so even RandomResizedCrop's smallest crop (8% of the
# area) still covers more than 224 pixels of real detail. Photos smaller than this are untouched.
DECODE_MIN_SIDE = 4 * IMAGE_SIZE

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"


class DataError(Exception):
    """Something wrong with the user's data: the message says what and what to do."""


AUTO_AUGMENT = {  # torchvision's learned or random augmentation policies, on PIL images
    "trivialaugment": transforms.TrivialAugmentWide,
    "randaugment": transforms.RandAugment,
    "autoaugment": transforms.AutoAugment,  # its ImageNet policy
}
ERASE_VALUE = 127  # uint8 grey: 0 after normalisation with mean 0.5, like erasing to the mean


def build_transforms(train, image_size=IMAGE_SIZE, auto_augment=None, random_erase=0.0,
                     val_resize=None, val_crop=None):
    """The one place that builds the per-image transforms (PIL image in, uint8 C x H x W out).

    Training: a random crop resized to image_size, a flip, optionally an augmentation policy and
    random erasing. Evaluation: the image resized to val_resize x val_resize (aspect not kept, as
    the classic script does), then its centre val_crop x val_crop; both default to image_size.
    """
    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
        if auto_augment:
            steps.append(AUTO_AUGMENT[auto_augment]())
        steps.append(transforms.PILToTensor())
        if random_erase > 0:
            steps.append(transforms.RandomErasing(p=random_erase, value=ERASE_VALUE))
        return transforms.Compose(steps)
    val_crop = val_crop or image_size
    val_resize = val_resize or val_crop
    steps = [transforms.Resize((val_resize, val_resize))]
    if val_crop != val_resize:
        steps.append(transforms.CenterCrop(val_crop))
    steps.append(transforms.PILToTensor())
    return transforms.Compose(steps)


def build_batch_mix(mixup_alpha, cutmix_alpha, num_classes):
    """torchvision's MixUp and/or CutMix (one of the two per batch when both are on), or None.

    Applied to (images, class indices), it returns the mixed images and soft targets N x classes.
    Its draws come from the global generator, whose state last.pth saves, so resume stays exact.
    """
    mixes = []
    if mixup_alpha > 0:
        mixes.append(transforms_v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(transforms_v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else transforms_v2.RandomChoice(mixes)


def normalize_batch(images, mean=MEAN, std=STD, channels_last=False):
    """uint8 N x C x H x W -> float32, scaled to [0, 1] and normalised, on images' device."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(dtype=torch.float32, memory_format=memory_format)
    return images.div_(255).sub_(mean).div_(std)


def _draft(img, min_side):
    """Ask a JPEG for its reduced DCT scale before decoding (sets img.size; decodes nothing)."""
    if img.format == "JPEG" and min_side:
        img.draft("RGB", (min_side, min_side))  # only ever shrinks by a power of two


def load_image(path, min_side=DECODE_MIN_SIDE):
    """Decode one file to an upright RGB PIL image; raises OSError/ValueError for unreadable files.

    Upright: a camera that stores a photo sideways tags it with an EXIF orientation, which photo
    viewers apply; so does this, before anything else sees the pixels.
    """
    with Image.open(path) as img:
        _draft(img, min_side)
        return ImageOps.exif_transpose(img).convert("RGB")


def find_classes(root):
    """Sorted class folder names, as torchvision's ImageFolder orders them."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders: expected {root}/<class name>/<images>")
    return classes


def list_images(root, classes):
    """(path, class index) pairs in sorted order; every class must hold at least one image."""
    samples = []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, names in os.walk(folder, followlinks=True)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the folder")
        samples.extend((f, index) for f in files)
    return samples


def val_count(n, val_ratio):
    """Images of a class of n that go to val: int(n * ratio) as the classic script takes (3,306 train
    / 364 val for the flower photos), at least 1 when n >= 2, at most n - 1."""
    k = int(n * val_ratio)
    if n >= 2:
        k = max(k, 1)
    return max(0, min(k, n - 1))


def split_samples(samples, classes, val_ratio=0.1, seed=0):
    """A stratified train/val split of (path, class index) pairs: (train, val), each in sorted order.

    Each class's sorted files are shuffled by an RNG seeded from the seed and the class name (a
    string seed is hashed with SHA-512: the same on every platform), and the first val_count of
    them go to val. The split depends only on the seed, the class names and the file names, so
    adding or removing one class leaves the others' split unchanged.
    """
    train, val = [], []
    for index, name in enumerate(classes):
        files = [path for path, target in samples if target == index]
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val = val_count(len(files), val_ratio)
        val.extend((path, index) for path in files[:n_val])
        train.extend((path, index) for path in files[n_val:])
    return sorted(train, key=lambda s: (s[1], s[0])), sorted(val, key=lambda s: (s[1], s[0]))


def _decode_or_error(path):
    try:
        return np.asarray(load_image(path)), None
    except Exception as e:  # any decoder failure means the same thing here: an unusable file
        return None, f"{type(e).__name__}: {e}"


class FlowerFolder(Dataset):
    """An ImageFolder tree (root/<class>/<image>), or the given samples of one, whose unreadable
    files follow an explicit policy.

    Every file is decoded once when the dataset is built. ``bad_images="skip"`` drops unreadable
    files and lists them in ``self.skipped``; ``"error"`` raises DataError naming the first one.
    With ``cache=True`` the decoded pixels are kept in memory, so later epochs never touch the
    disk or the JPEG decoder; otherwise they are decoded again from disk on every access.
    """

    def __init__(self, root, transform, classes=None, cache=False, bad_images="skip", threads=4, samples=None):
        self.root = root
        self.transform = transform
        self.classes = classes if classes is not None else find_classes(root)
        samples = samples if samples is not None else list_images(root, self.classes)
        self.skipped = []
        self.cache = [] if cache else None
        kept = []
        with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow decodes without the GIL
            for (path, target), (pixels, error) in zip(samples, pool.map(_decode_or_error, [p for p, _ in samples])):
                if error is not None:
                    if bad_images == "error":
                        raise DataError(f"cannot read image {path} ({error}): remove or replace it, "
                                        "or pass --bad-images skip")
                    self.skipped.append((path, error))
                    continue
                kept.append((path, target))
                if cache:
                    self.cache.append(pixels)
        if not kept:
            raise DataError(f"no readable images under {root}")
        self.samples = kept
        self.targets = [t for _, t in kept]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        # EpochSampler hands out (index, seed): each draw of the augmentation comes from its own
        # seed, so a run is the same whatever the worker count, and resumes exactly mid-epoch.
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, target = self.samples[index]
        image = Image.fromarray(self.cache[index]) if self.cache is not None else load_image(path)
        if seed is None:
            return self.transform(image), target
        # torchvision's random transforms draw from the CPU generator: seed it for this image and
        # put its state back, so dropout's stream is untouched. (torch.manual_seed would also seed
        # every other backend: 0.2 ms an image, a sixth of the time it takes to prepare one.)
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image), target
        finally:
            generator.set_state(saved)


class EpochSampler(Sampler):
    """The sample order of one epoch, split over the processes of a distributed run.

    The order depends only on (seed, epoch), like DistributedSampler's. Training pads the order
    with its first samples so every process runs the same number of steps; validation
    (pad=False) hands each image to exactly one process. ``start`` skips samples this process
    has already seen, to resume in the middle of an epoch.
    """

    def __init__(self, size, shuffle, seed=0, rank=0, world_size=1, pad=True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _indices(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size % self.world_size:
            order += order[: self.world_size - self.size % self.world_size]
        return order[self.rank :: self.world_size]

    @property
    def epoch_length(self):
        """Samples this process gets in a whole epoch (len() counts those left after ``start``)."""
        return len(self._indices())

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007
        for i in self._indices()[self.start :]:
            yield (i, (base + i) % 2**63) if self.shuffle else i

    def __len__(self):
        return len(self._indices()) - self.start


def estimate_decoded_bytes(paths):
    """Bytes these images take decoded to RGB, read from their headers without decoding."""
    total = 0
    for path in paths:
        try:
            with Image.open(path) as img:
                _draft(img, DECODE_MIN_SIDE)
                total += img.size[0] * img.size[1] * 3
        except Exception:
            pass  # unreadable files are reported when the dataset is built
    return total


def available_memory_bytes():
    """MemAvailable from /proc/meminfo where there is one, else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def decide_cache(mode, paths, log=print):
    """Whether to keep the decoded images in memory: 'auto' caches when they fit in half the free memory."""
    if mode == "off":
        return False
    need = estimate_decoded_bytes(paths)
    free = available_memory_bytes()
    fits = need <= free // 2
    gib = 2 ** 30
    if fits:
        log(f"cache: keeping decoded images in memory: {need / gib:.2f} GiB of {free / gib:.1f} GiB available")
    elif mode == "on":
        raise DataError(f"--cache on needs {need / gib:.1f} GiB but only {free / gib:.1f} GiB is available "
                        "(the cache may take at most half): use --cache auto or --cache off")
    else:
        log(f"cache: decoded images need {need / gib:.1f} GiB, more than half of the {free / gib:.1f} GiB "
            "available: streaming from disk instead")
    return fits


def make_loader(dataset, sampler, batch_size, workers, device):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",  # lets the copy to the GPU overlap with compute
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Each iterator draws its base seed from this generator, not from the global RNG that
        # dropout uses: otherwise a run resumed mid-epoch (whose iterator starts after the RNG
        # state is restored) draws different dropout masks than the uninterrupted run.
        # The augmentation is seeded per sample by EpochSampler, so nothing else uses that seed.
        generator=torch.Generator(),
    )


def default_workers(batch_size, device, cached):
    """Worker processes for the loader.

    On a CPU the model's own threads already use every core: workers would only take turns with
    them, so cached images (a crop and a flip, about 1 ms each) are prepared in the main process,
    and JPEG decoding from disk gets one worker that overlaps it with the compute. On CUDA the CPU
    is free for decoding: min(cpu count, batch size, 8), as the classic scripts do.
    """
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return min(cpus, batch_size if batch_size > 1 else 0, 8)
    return 0 if cached else min(1, cpus - 1)


def download_flowers(dest_dir, url=FLOWERS_URL, sha256=FLOWERS_SHA256, log=print):
    """Fetch flower_photos.tgz (URL, file:// URL or local path), check its SHA-256, extract into dest_dir.

    Returns the path of the extracted flower_photos folder. The archive is written to a temporary
    file beside its final place and renamed only once its checksum is right.
    """
    archive = os.path.join(dest_dir, "flower_photos.tgz")
    if os.path.exists(url):
        src, total = open(url, "rb"), os.path.getsize(url)
    else:
        try:
            src = urllib.request.urlopen(url, timeout=60)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot download {url} ({e}): check the network, or pass --data-url "
                            "with a mirror or a local copy of flower_photos.tgz")
        total = int(src.headers.get("Content-Length") or 0) or None
    try:
        os.makedirs(dest_dir, exist_ok=True)
        return _fetch_and_extract(src, total, url, sha256, dest_dir, archive, log)
    except OSError as e:
        raise DataError(f"cannot fetch and unpack the flower photos into {dest_dir} ({e.strerror or e}): check "
                        "the network and the free disk space (they need about 0.5 GB), or pass --data-path "
                        "with another folder")


def _fetch_and_extract(src, total, url, sha256, dest_dir, archive, log):
    from tqdm import tqdm

    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".flower_photos.", suffix=".part")
    try:
        with src, os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                    desc="download", file=sys.stderr) as bar:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if sha256 and digest.hexdigest() != sha256:
            raise DataError(f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                            "the download is damaged or not flower_photos.tgz; try again or use another --data-url")
        os.replace(tmp, archive)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    log(f"extracting {archive}")
    extracted = os.path.join(dest_dir, "flower_photos")
    if os.path.isdir(extracted):
        shutil.rmtree(extracted)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest_dir, filter="data")  # refuses links and paths outside dest_dir
        else:  # a Python from before the 2023 tarfile update: the same refusal, by hand
            for member in tar.getmembers():
                parts = member.name.replace("\\", "/").split("/")
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive} holds an unsafe entry {member.name!r}: it is not the flower archive")
            tar.extractall(dest_dir)
    if not os.path.isdir(extracted):
        raise DataError(f"{archive} has no flower_photos folder: it is not the flower photos archive")
    return extracted
