"""Training data: finding the images and the split, the transforms, the dataset, its order, the loaders.

    find_data       a folder of class folders (split here) or a train/ and val/ split -> FoundData
    train_transform, EvalTransform   the per-image transforms, the one place they are built
    ImageDataset    (path, class) samples decoded when first needed, kept in the machine's image cache
                    (training/image_cache.py: its size, --cache, and where it lives)
    EpochSampler    the order of one epoch, split over processes, seeded per image for exact resume

Scaling to [0, 1] and the normalisation happen once per batch on the training device
(``normalize_batch``): the same arithmetic as torchvision's ToTensor + Normalize, a quarter of the
bytes to copy, and one pass.
"""
import contextlib
import functools
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2

from inference import calibration, images
from inference.images import IMAGE_EXTENSIONS, MEAN, STD
from plumbing import distributed
from plumbing.options import UserError
from training import image_cache
from training.image_cache import BAD, UNKNOWN

LAYOUTS = "a folder of class folders (DIR/<class>/<images>) or of a split (DIR/train/<class>/, DIR/val/<class>/)"


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
AUTO_AUGMENT = {  # torchvision's learned or random augmentation policies, on PIL images
    "trivialaugment": transforms.TrivialAugmentWide,
    "randaugment": transforms.RandAugment,
    "autoaugment": transforms.AutoAugment,  # its ImageNet policy
}
ERASE_VALUE = 127  # uint8 grey: 0 after normalisation with mean 0.5, like erasing to the mean


def train_transform(image_size, auto_augment=None, random_erase=0.0):
    """A random crop resized to image_size, a flip, optionally an augmentation policy and random erasing."""
    steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    if auto_augment:
        steps.append(AUTO_AUGMENT[auto_augment]())
    steps.append(transforms.PILToTensor())
    if random_erase > 0:
        steps.append(transforms.RandomErasing(p=random_erase, value=ERASE_VALUE))
    return transforms.Compose(steps)


class EvalTransform:
    """The evaluation preprocessing (images.resize_and_crop, the one shared with predict.py and
    the .onnx path) as a transform: PIL image in, uint8 3 x crop x crop tensor out."""

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image):
        return torch.from_numpy(images.resize_and_crop(image, self.preprocessing)).permute(2, 0, 1)


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


def normalize_batch(batch, mean=MEAN, std=STD, channels_last=False):
    """uint8 N x C x H x W -> float32, scaled to [0, 1] and normalised, on batch's device."""
    mean, std = normalization(tuple(mean), tuple(std), batch.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = batch.to(dtype=torch.float32, memory_format=memory_format)
    return batch.div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=8)
def normalization(mean, std, device):
    """(mean, std) as 1 x C x 1 x 1 float32 tensors on device, made once per device: a tensor made
    from Python numbers is copied from the host, and on a GPU that copy waits for every queued kernel."""
    with torch.inference_mode(False):  # usable outside inference mode too, whichever mode made them
        return (torch.tensor(mean, device=device).view(1, -1, 1, 1),
                torch.tensor(std, device=device).view(1, -1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Finding the images, and the train/val split
# ---------------------------------------------------------------------------------------------
def find_classes(root):
    """Sorted class folder names, as torchvision's ImageFolder orders them."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class folders: expected {root}/<class name>/<images>")
    return classes


def not_sure_class(classes):
    """What is wrong with a class named as the answer for a photo the model is not sure of ("unknown",
    in any case: the folders of --sort-into may ignore it), or None: train.py refuses such a class."""
    name = next((c for c in classes if c.lower() == calibration.UNKNOWN), None)
    return name and (f"class folder {name} reads as \"{calibration.UNKNOWN}\", the answer of predict.py, the page "
                     "and --sort-into for a photo the model is not sure of")


def list_images(root, classes, allow_empty=False):
    """(path, class index) pairs in sorted order; every class must hold at least one image, unless
    allow_empty (data_set.check, which reports such a class with its other findings)."""
    samples = []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = images.find_image_files(folder, within=root)
        if not files and not allow_empty:
            raise no_images_error([folder])
        samples.extend((f, index) for f in files)
    return samples


def no_images_error(folders):
    """The one line for class folders that hold no image: what train.py stops at, and data_set.check ends with."""
    kinds = ", ".join(IMAGE_EXTENSIONS)
    if len(folders) == 1:
        return UserError(f"class folder {folders[0]} has no images ({kinds}): add images or remove the folder")
    return UserError(f"class folders {', '.join(folders)} have no images ({kinds}): add images or remove them")


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
    by_class = [[] for _ in classes]
    for path, target in samples:  # one pass: linear in the number of photos, whatever the classes
        by_class[target].append(path)
    train, val = [], []
    for index, (name, files) in enumerate(zip(classes, by_class)):
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val = val_count(len(files), val_ratio)
        val.extend((path, index) for path in files[:n_val])
        train.extend((path, index) for path in files[n_val:])
    return sorted(train, key=lambda s: (s[1], s[0])), sorted(val, key=lambda s: (s[1], s[0]))


@dataclass
class FoundData:
    """The classes and the (path, class index) samples to train and validate on; split is the
    record of a split made here (None for a train/ and val/ tree), review that of the DIR/review.csv
    applied (data_set/review.py; None for none): both saved in the checkpoints."""

    classes: list
    train: list
    val: list
    split: Optional[dict]
    review: Optional[dict] = None


def find_data(root, val_ratio=0.1, split_seed=0, recorded_split=None, eval_only=False, missing_hint=None,
              log=print, allow_empty=False):
    """The data under root, in one of two layouts.

    root/train/<class>/ with root/val/<class>/, a split made beforehand (by data_set/split_data.py,
    say), is used as it is. root/<class>/, a plain folder of class folders, is split here: val_ratio
    of each class held out with split_samples (split_data.py's rule, so the same split); a
    recorded split (resume, --eval-only) is used again exactly as it was. allow_empty: see list_images.
    """
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist: {missing_hint or 'pass --data-path with ' + LAYOUTS}")
    if os.path.isdir(train_dir) or os.path.isdir(val_dir):
        for folder in ([] if eval_only else [train_dir]) + [val_dir]:
            if not os.path.isdir(folder):
                raise UserError(f"data folder {folder} does not exist: a split needs both "
                                f"{train_dir} and {val_dir}")
        classes = find_classes(val_dir if eval_only else train_dir)
        if not eval_only:
            for name, there, missing in ((c, val_dir, train_dir) for c in find_classes(val_dir) if c not in classes):
                raise UserError(f"class {name} has a folder in {there} but none in {missing}: its val images would "
                                f"never be evaluated; add {os.path.join(missing, name)} or remove the class")
            for name in (c for c in classes if not os.path.isdir(os.path.join(val_dir, c))):
                raise UserError(f"class {name} has a folder in {train_dir} but none in {val_dir}: it would never "
                                f"be evaluated; add {os.path.join(val_dir, name)} or remove the class")
        train = [] if eval_only else list_images(train_dir, classes, allow_empty)
        return FoundData(classes, train, list_images(val_dir, classes, allow_empty), None)

    folders = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    if not folders:
        files = sum(1 for e in os.scandir(root) if e.is_file())
        raise UserError(f"{root} holds {files} file(s) and no folders: pass --data-path with {LAYOUTS}")
    classes = sorted(folders)
    samples = list_images(root, classes, allow_empty)
    if recorded_split is not None:
        val = [(os.path.join(root, *f.split("/")), classes.index(f.split("/")[0]))
               for f in recorded_split["val_files"] if f.split("/")[0] in classes]
        missing = [p for p, _ in val if not os.path.isfile(p)]
        if missing or len(val) != len(recorded_split["val_files"]):
            raise UserError(f"{root} no longer holds the run's val images ({(missing or ['a class'])[0]} "
                            "is missing): use the folder the run was trained on")
        held_out = {p for p, _ in val}
        train = [s for s in samples if s[0] not in held_out]
        split = recorded_split
    else:
        train, val = split_samples(samples, classes, val_ratio, split_seed)
        split = {"val_ratio": val_ratio, "seed": split_seed,
                 "val_files": [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in val]}
    log(f"split: {root} is a folder of class folders; held out for val (ratio {split['val_ratio']}, "
        f"seed {split['seed']}): " + ", ".join(f"{c} {sum(k == i for _, k in train)}/{sum(k == i for _, k in val)}"
                                               for i, c in enumerate(classes)) + " (train/val)")
    return FoundData(classes, [] if eval_only else train, val, split)


def split_dataset(source, dest, val_ratio=0.1, seed=0, force=False, log=print):
    """Copy source/<class>/* into dest/{train,val}/<class>/ with split_samples; {class: (n_train, n_val)}."""
    if not 0 < val_ratio < 1:
        raise UserError(f"val ratio must be between 0 and 1 (exclusive), got {val_ratio}")
    if not os.path.isdir(source):
        raise UserError(f"source folder {source} does not exist: extract flower_photos.tgz there "
                        "(see data_set/README.md), or pass --source with a folder of class folders")
    classes = find_classes(source)
    samples = list_images(source, classes)
    train_dir, val_dir = outputs = [os.path.join(dest, "train"), os.path.join(dest, "val")]
    for out in outputs:
        # --force deletes these folders, so they must not hold the photos being split; nor may they
        # sit inside the source, where the next run would take them for classes.
        real_source, real_out = os.path.realpath(source), os.path.realpath(out)
        if images.inside(real_source, real_out) or images.inside(real_out, real_source):
            raise UserError(f"source {source} and output {out} overlap: choose a --dest outside "
                            "the source folder")
        if os.path.exists(out) and not force:
            raise UserError(f"{out} already exists: pass --force to replace it")
    for out in outputs:
        if os.path.exists(out):
            shutil.rmtree(out)  # only train/ and val/: dest may also hold the source photos

    train, val = split_samples(samples, classes, val_ratio, seed)
    for out, part in ((train_dir, train), (val_dir, val)):
        for path, index in part:
            # Keep the path below the class folder, so files in subfolders cannot collide.
            name = classes[index]
            target = os.path.join(out, name, os.path.relpath(path, os.path.join(source, name)))
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(path, target)
            except OSError as e:
                raise UserError(f"cannot copy {path} to {target} ({e.strerror or e}): free some disk space, "
                                "or pass --dest with another folder") from e
    counts = {name: (sum(1 for _, k in train if k == i), sum(1 for _, k in val if k == i))
              for i, name in enumerate(classes)}
    _log_table(counts, log)
    for name, (_, n_val) in counts.items():
        if n_val == 0:
            log(f"warning: class {name} has a single image, so val has none of it")
    return counts


def _log_table(counts, log):
    rows = [(name, t, v) for name, (t, v) in counts.items()]
    rows.append(("total", sum(t for _, t, _ in rows), sum(v for _, _, v in rows)))
    width = max(len("class"), *(len(name) for name, _, _ in rows))
    log(f"{'class':<{width}}  {'train':>6}  {'val':>6}  {'total':>6}")
    for name, t, v in rows:
        log(f"{name:<{width}}  {t:>6}  {v:>6}  {t + v:>6}")


# ---------------------------------------------------------------------------------------------
# The dataset and its order
# ---------------------------------------------------------------------------------------------
def unreadable_error(path, reason=None):
    """--bad-images error's one line."""
    return UserError(f"cannot read image {path}" + (f" ({reason})" if reason else "")
                     + ": remove or replace it, or pass --bad-images skip")


def find_unreadable(paths, threads=8, chunk=1024):
    """[(path, reason)] of the files that images.unreadable finds to be no images, in order."""
    # Threads, because the reads wait on the disk, not the GIL; in chunks, because a thread pool
    # makes one future per call (its chunksize is for processes only), which cost 80 us a file.
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = [reason for part in pool.map(check_files, chunks) for reason in part]
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def unreadable_paths(paths, bad_images, log):
    """The set of paths images.unreadable finds to be no images, listed in one line (--bad-images
    skip), or the first of them as an error (--bad-images error)."""
    skipped = find_unreadable(paths)
    if skipped and bad_images == "error":
        raise unreadable_error(*skipped[0])
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(f"{p} ({e})" for p, e in skipped))
    return {p for p, _ in skipped}


def check_files(paths):
    return [images.unreadable(path) for path in paths]


class ImageDataset(Dataset):
    """(path, class index) samples, decoded with images.load_image when first needed and kept in
    the shared cache (image_cache.SharedImageCache) while it has room; each item is (image, class, valid).

    An image that cannot be decoded is marked unreadable in the cache's statuses, which every local
    process and loader worker shares, and is never decoded again. In training (substitute=True)
    its place is taken by the next readable sample, the same one in every epoch and every process,
    so runs and resumes stay exact; in evaluation it comes back with valid=False and is left out
    of the metrics. writer: this process's first writer number in the cache (its loader workers
    take the next ones). An image's first decoding also leaves its perceptual hash in the cache,
    for check_leakage.
    """

    def __init__(self, samples, transform, cache, substitute=True, writer=0):
        if not samples:
            raise UserError("no readable images: every file failed the check")
        self.samples, self.transform, self.cache = samples, transform, cache
        self.substitute, self.writer = substitute, writer
        self.targets = [t for _, t in samples]

    def __len__(self):
        return len(self.samples)

    def unreadable(self):
        """The paths of the samples found unreadable so far, by any process sharing the cache."""
        return [self.samples[i][0] for i in self.cache.bad_indices()]

    def mark_unreadable(self, paths):
        """On resume: the images the run found unreadable are so again, without decoding them."""
        wanted = set(paths)
        for index, (path, _) in enumerate(self.samples):
            if path in wanted:
                self.cache.mark_bad(index)

    def pixels(self, index):
        """uint8 H x W x 3 of one sample, from the cache or decoded (and cached); None if unreadable."""
        pixels = self.cache.get(index)
        if pixels is not None or self.cache.status[index] == BAD:
            return pixels
        try:
            image = images.load_image(self.samples[index][0])
        except Exception:  # any decoder failure means the same thing here: an unusable file
            self.cache.mark_bad(index)
            return None
        pixels = np.asarray(image)
        # hashed once per run, at the first decoding (--cache off decodes again every epoch): the
        # leakage check's only cost, a fifth of a flower photo's decoding (check_leakage)
        near = images.near_hash(images.reduced_for_hash(image)) if self.cache.status[index] == UNKNOWN else 0
        worker = torch.utils.data.get_worker_info()
        self.cache.put(index, pixels, self.writer + (worker.id if worker is not None else 0), near)
        return pixels

    def __getitem__(self, item):
        # EpochSampler hands out (index, seed): each draw of the augmentation comes from its own
        # seed, so a run is the same whatever the worker count, and resumes exactly mid-epoch.
        index, seed = item if isinstance(item, tuple) else (item, None)
        pixels, used = self.pixels(index), index
        while pixels is None and self.substitute:
            used = (used + 1) % len(self.samples)
            if used == index:
                raise UserError(f"none of the {len(self.samples)} images could be read")
            pixels = self.pixels(used)
        if pixels is None:
            crop = self.transform.preprocessing.crop
            return torch.zeros(3, crop, crop, dtype=torch.uint8), self.targets[index], False
        image = Image.fromarray(pixels)
        if seed is None:
            return self.transform(image), self.targets[used], True
        # torchvision's random transforms draw from the CPU generator: seed it for this image and
        # put its state back, so dropout's stream is untouched. (torch.manual_seed would also seed
        # every other backend: 0.2 ms an image, a sixth of the time it takes to prepare one.)
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(image), self.targets[used], True
        finally:
            generator.set_state(saved)


def inverse_frequency(targets):
    """Per class, images / (classes x the class's images): weights under which every class counts
    as much as any other (--class-weights balanced)."""
    counts = torch.bincount(torch.tensor(targets)).double()
    return (counts.sum() / (len(counts) * counts.clamp_min(1))).float()


def balanced_draws(targets):
    """Per sample, the inverse of its class's count: drawn with these weights, every class is as
    likely (--sampler balanced)."""
    counts = torch.bincount(torch.tensor(targets)).double()
    return (1.0 / counts)[torch.tensor(targets)]


class EpochSampler(Sampler):
    """The sample order of one epoch, split over the processes of a distributed run.

    The order depends only on (seed, epoch), like DistributedSampler's. Training pads the order
    with its first samples, repeated as often as needed (one image on four processes: four
    copies), so every process runs the same number of steps; validation
    (pad=False) hands each image to exactly one process. ``skip`` leaves out the samples this
    process has already seen, to resume in the middle of an epoch.
    """

    def __init__(self, size, shuffle, seed=0, rank=0, world_size=1, pad=True, weights=None):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _indices(self):
        """(sample index, its augmentation seed's key) for this process, in order."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            # drawn with replacement: a sample can come twice, so its seed follows its place in
            # the epoch (each copy is augmented differently), not its index
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=g).tolist()
            keys = range(len(order))
        else:
            order = torch.randperm(self.size, generator=g).tolist() if self.shuffle else list(range(self.size))
            keys = order
        pairs = list(zip(order, keys))
        if self.pad and self.size % self.world_size:
            # cyclically: with fewer samples than processes, one pass of them cannot fill the gap
            missing = self.world_size - self.size % self.world_size
            pairs += [pairs[i % len(pairs)] for i in range(missing)]
        return pairs[self.rank :: self.world_size]

    @property
    def epoch_length(self):
        """Samples this process gets in a whole epoch (len() counts those left after ``skip``)."""
        return len(self._indices())

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007
        for i, key in self._indices()[self.skip :]:
            yield (i, (base + key) % 2**63) if self.shuffle else i

    def __len__(self):
        return len(self._indices()) - self.skip


@contextlib.contextmanager
def worker_failures():
    """A loader worker that dies for want of shared memory ends the command in one line. Workers hand
    their batches over through /dev/shm, which Docker makes 64 MB unless told otherwise; a worker that
    finds it full dies of a bus error, which torch reports as a RuntimeError whose cause says so."""
    try:
        yield
    except RuntimeError as e:
        if not out_of_shared_memory(e):
            raise
        raise UserError("a data loader worker ran out of shared memory (/dev/shm, 64 MB in a Docker container "
                        "by default): pass --workers 0 to load in the main process, or give the container more "
                        "(docker run --shm-size 8g ...)") from e


def out_of_shared_memory(error):
    """Whether error (or what caused it) is a DataLoader worker's bus error or full /dev/shm."""
    text = ""
    for _ in range(4):  # torch's "exited unexpectedly" holds the worker's own error as its cause
        if error is None:
            break
        text += str(error) + "\n"
        error = error.__cause__ or error.__context__
    return "DataLoader worker" in text and any(
        sign in text for sign in ("Bus error", "shared memory", "No space left on device"))


def make_loader(dataset, sampler, batch_size, workers, device):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",  # lets the copy to the GPU overlap with compute
        # forked workers share the image cache's anonymous mapping (image_cache.FORKED_WORKERS)
        multiprocessing_context="fork" if workers > 0 and image_cache.FORKED_WORKERS else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Each iterator draws its base seed from this generator, not from the global RNG that
        # dropout uses: otherwise a run resumed mid-epoch (whose iterator starts after the RNG
        # state is restored) draws different dropout masks than the uninterrupted run.
        # The augmentation is seeded per sample by EpochSampler, so nothing else uses that seed.
        generator=torch.Generator(),
    )


@dataclass
class Loaders:
    """The training loader (None for --eval-only) and its crop size, the val loader, and the number
    of loader workers; progressive resizing replaces train (see with_crop)."""

    train: Optional[DataLoader]
    val: DataLoader
    workers: int
    crop: int


def build_loaders(args, found, preprocessing, device, rank, world_size, log):
    """The Loaders of train.py's options. The files are only listed and checked here
    (images.unreadable); they are decoded when first loaded, into this machine's cache."""
    bad = unreadable_paths([p for p, _ in found.train + found.val], args.bad_images, log)
    samples = {part: [s for s in items if s[0] not in bad] for part, items in (("train", found.train),
                                                                            ("val", found.val))}
    capacity = image_cache.cache_capacity(args.cache, [p for p, _ in samples["train"] + samples["val"]], log=log)
    workers = (args.workers if args.workers is not None
               else images.default_workers(device.type, args.batch_size, capacity > 0))
    auto_augment = None if args.auto_augment == "none" else args.auto_augment
    total = max(len(samples["train"]) + len(samples["val"]), 1)
    loaders = []
    for part in ("train", "val"):
        if part == "train" and args.eval_only:
            loaders.append(None)
            continue
        train = part == "train"
        shared, writer = image_cache.machine_cache(len(samples[part]), capacity * len(samples[part]) // total,
                                                   max(workers, 1), device)
        transform = (train_transform(args.image_size[0], auto_augment, args.random_erase) if train
                     else EvalTransform(preprocessing))
        dataset = ImageDataset(samples[part], transform, shared, substitute=train, writer=writer)
        weights = balanced_draws(dataset.targets) if train and args.sampler == "balanced" else None
        sampler = (EpochSampler(len(dataset), True, args.seed, rank, world_size, weights=weights) if train else
                   EpochSampler(len(dataset), False, 0, rank, world_size, pad=False))
        loaders.append(make_loader(dataset, sampler, args.batch_size, workers, device))
    return Loaders(loaders[0], loaders[1], workers, args.image_size[0])


def find_unknowns(folder, bad_images, log):
    """The readable images under folder (--unknowns: photos of none of the classes), checked as the
    data's are at start-up."""
    if not os.path.isdir(folder):
        raise UserError(f"--unknowns folder {folder} does not exist: pass a folder of photos of none of the classes")
    paths = images.find_image_files(folder)
    bad = unreadable_paths(paths, bad_images, log)
    paths = [p for p in paths if p not in bad]
    if not paths:
        raise UserError(f"--unknowns folder {folder} holds no readable images ({', '.join(images.IMAGE_EXTENSIONS)})")
    return paths


def unknowns_loader(paths, preprocessing, args, device, rank, world_size, workers):
    """find_unknowns' images, loaded as the val images are, uncached. Their class index is a
    placeholder (0): only their logits are used. Every process makes it at once (machine_cache)."""
    shared, writer = image_cache.machine_cache(len(paths), 0, max(workers, 1), device)
    dataset = ImageDataset([(p, 0) for p in paths], EvalTransform(preprocessing), shared, substitute=False,
                           writer=writer)
    sampler = EpochSampler(len(dataset), False, 0, rank, world_size, pad=False)
    return make_loader(dataset, sampler, args.batch_size, workers, device)


def with_crop(loaders, size, args, device):
    """Make loaders.train crop images to size: a new loader over the same images and order when the
    size changes (loader workers hold a copy of the transform). The old loader is dropped with its
    persistent workers, which nothing else may hold, or they would idle on for the whole run."""
    if loaders.crop == size:
        return
    old = loaders.train
    auto_augment = None if args.auto_augment == "none" else args.auto_augment
    old.dataset.transform = train_transform(size, auto_augment, args.random_erase)
    loaders.train = make_loader(old.dataset, old.sampler, args.batch_size, old.num_workers, device)
    loaders.crop = size


def newly_unreadable(bad_images, device, loaders, progress):
    """The images found unreadable since the last look, from every machine's caches; added to progress."""
    mine = [path for loader in loaders for path in loader.dataset.unreadable()]
    found = sorted({p for part in distributed.all_gather(mine, device) for p in part} - set(progress.bad_images))
    progress.bad_images.extend(found)
    if found and bad_images == "error":  # found while validating
        raise unreadable_error(found[0])
    return found
