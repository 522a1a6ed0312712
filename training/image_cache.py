"""The image cache: the decoded images, kept once per machine for every local process and loader
worker; how large it may be (--cache) and where it lives.

    cache_capacity    --cache auto/on/off: the bytes of pixels to keep, from the images' headers and
                      the memory free (or /dev/shm's space, where the processes share the cache)
    machine_cache     this machine's SharedImageCache: made by its first process, opened by the others
    SharedImageCache  the statuses, perceptual hashes and pixels of the images, in one shared mapping

It is one shared memory mapping: anonymous for a single process (its forked loader workers share
it), or, under torchrun, one file in /dev/shm (memory) where there is one, else in the temp
folder, that every process of the run on this machine maps; on Linux that file is removed from
the folder as soon as they all have it open, so the kernel frees it when the last of them ends,
crashed or not. It holds, for each image, a status (not loaded yet, cached, unreadable, read from disk) and, while
there is room, the decoded pixels: the first epoch fills it as the images are loaded, the later
ones read memory instead of decoding JPEGs. With --cache off it holds the statuses only, so that an
unreadable image that a loader worker meets is known to the main process too. Beside each image's
status it keeps the 64-bit perceptual hash (images.near_hash) of its first decoding, with the cache
on or off: after one epoch every process can compare the val images with the training images
(train.py's leakage line) without reading a file again.

Each writer (a process, or one of its loader workers) fills its own slab of the arena, so no two
writers ever allocate the same bytes and no lock is needed; an image that does not fit in its
writer's slab is read from disk each time (and counted).
"""
import atexit
import mmap
import os
import random
import sys
import tempfile

import numpy as np

from inference import images
from plumbing import distributed
from plumbing.options import UserError

UNKNOWN, CACHED, BAD, STREAMED = 0, 1, 2, 3
# Linux forks loader workers (data.make_loader asks for it), which share an anonymous mapping; the
# other platforms spawn them, and those open the cache's file by name.
FORKED_WORKERS = sys.platform.startswith("linux")
_MAGIC = b"GNETCACH"
_ALIGN = 64


def _aligned(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def shared_folder():
    """/dev/shm where it exists (memory, not disk), else the temp folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def free_bytes(folder):
    try:
        stat = os.statvfs(folder)
        return stat.f_bavail * stat.f_frsize
    except (OSError, AttributeError):  # Windows has no statvfs
        return 2 ** 62


class SharedImageCache:
    """Statuses and decoded pixels (uint8 H x W x 3) of `count` images, shared through one mapped file.

    Layout: a 64-byte header (magic, count, writers, slab size, a flag set when an image turns
    out unreadable), the writers' fill levels, one status byte per image, each image's (offset,
    height, width), each image's perceptual hash, then the arena of `writers` slabs of `slab`
    bytes each.
    """

    def __init__(self, mapping, path=None, fd=None):
        self.map, self.path, self.fd = mapping, path, fd
        header = np.frombuffer(self.map, dtype=np.int64, count=8)
        if bytes(self.map[:8]) != _MAGIC:
            raise ValueError(f"{path} is not an image cache")
        self.count, self.writers, self.slab = int(header[1]), int(header[2]), int(header[3])
        offset = _ALIGN
        self.fill = np.frombuffer(self.map, dtype=np.int64, count=self.writers, offset=offset)
        offset = _aligned(offset + 8 * self.writers)
        self.status = np.frombuffer(self.map, dtype=np.uint8, count=self.count, offset=offset)
        offset = _aligned(offset + self.count)
        self.where = np.frombuffer(self.map, dtype=np.int64, count=3 * self.count, offset=offset).reshape(-1, 3)
        offset = _aligned(offset + 24 * self.count)
        self.near = np.frombuffer(self.map, dtype=np.uint64, count=self.count, offset=offset)
        self.arena = _aligned(offset + 8 * self.count)
        self._flags = np.frombuffer(self.map, dtype=np.int64, count=1, offset=32)

    @classmethod
    def create(cls, count, capacity, writers=1, as_file=False, folder=None):
        """A new cache for count images with about capacity bytes of pixels (0: statuses only):
        anonymous memory, or with as_file a file that other processes can attach to."""
        writers = max(1, writers)
        slab = capacity // writers
        meta = _aligned(_aligned(_aligned(_aligned(_ALIGN + 8 * writers) + count) + 24 * count) + 8 * count)
        header = np.zeros(8, np.int64)
        header[1:4] = count, writers, slab
        header = _MAGIC + header.tobytes()[8:]
        if not as_file:  # pages are zeros until written, and take memory only then
            mapping = mmap.mmap(-1, meta + slab * writers)
            mapping[:len(header)] = header
            return cls(mapping)
        fd, path = tempfile.mkstemp(prefix="googlenet-cache-", dir=folder or shared_folder())
        try:
            # the metadata is written out now, so that a full folder fails here and not later;
            # the arena stays a hole that takes memory only where pixels are written
            os.write(fd, header)
            os.write(fd, bytes(meta - len(header)))
            os.ftruncate(fd, meta + slab * writers)
        except OSError:
            os.close(fd)
            os.remove(path)
            raise
        return cls(mmap.mmap(fd, meta + slab * writers), path, fd)

    @classmethod
    def attach(cls, path):
        """The cache another process of this machine created as a file at path."""
        fd = os.open(path, os.O_RDWR)
        return cls(mmap.mmap(fd, os.fstat(fd).st_size), path, fd)

    def unlink(self):
        """On Linux, remove the file's name now that every process has it open: the memory lives on
        while any of them maps it. Elsewhere loader workers are spawned and open it by name: it
        is removed when this process ends."""
        if FORKED_WORKERS:
            os.remove(self.path)
            self.path = None
        else:
            atexit.register(self.close)

    def close(self):
        # views into the map: it closes only without them
        del self.fill, self.status, self.where, self.near, self._flags
        self.map.close()
        if self.fd is not None:
            os.close(self.fd)
        if self.path and os.path.exists(self.path):
            os.remove(self.path)

    def __reduce__(self):
        # forked loader workers (Linux) share the mapping as it is; spawned ones open the file again
        if self.path is None:
            raise TypeError("an anonymous image cache is shared with forked loader workers only")
        return SharedImageCache.attach, (self.path,)

    @property
    def capacity(self):
        return self.slab * self.writers

    def get(self, index):
        """The cached pixels of an image (a copy), or None."""
        if self.status[index] != CACHED:
            return None
        offset, height, width = (int(v) for v in self.where[index])
        pixels = np.frombuffer(self.map, dtype=np.uint8, count=height * width * 3, offset=self.arena + offset)
        return pixels.reshape(height, width, 3).copy()

    def put(self, index, pixels, writer=0, near=0):
        """Keep an image's pixels if its writer's slab has room, and its perceptual hash (near, an
        int) in any case; True when the pixels were kept. Only the first decoding of an image counts."""
        if self.status[index] != UNKNOWN:
            return self.status[index] == CACHED
        self.near[index] = near  # before the status, which tells the other processes it is there
        n = pixels.size
        used = int(self.fill[writer])
        if used + n > self.slab:
            self.status[index] = STREAMED
            return False
        offset = writer * self.slab + used
        np.frombuffer(self.map, dtype=np.uint8, count=n, offset=self.arena + offset)[:] = pixels.reshape(-1)
        self.where[index] = (offset, pixels.shape[0], pixels.shape[1])
        self.fill[writer] = used + n
        self.status[index] = CACHED  # last: another process reads the pixels only after this
        return True

    def mark_bad(self, index):
        self.status[index] = BAD
        self._flags[0] = 1

    @property
    def found_bad(self):
        """True once any image was marked unreadable (a cheap check for every step)."""
        return bool(self._flags[0])

    def bad_indices(self):
        return np.flatnonzero(self.status == BAD).tolist()

    def hashes(self):
        """(indices, uint64 perceptual hashes) of the images decoded so far, by any process sharing the cache."""
        decoded = np.flatnonzero((self.status == CACHED) | (self.status == STREAMED))
        return decoded, self.near[decoded].copy()

    def counts(self):
        """(cached, streamed) images so far, and the bytes their pixels take."""
        return (int((self.status == CACHED).sum()), int((self.status == STREAMED).sum()), int(self.fill.sum()))


# ---------------------------------------------------------------------------------------------
# How large, and where: one cache per machine
# ---------------------------------------------------------------------------------------------
def estimate_decoded_bytes(paths, sample=1000):
    """Bytes these images take decoded to RGB: the mean of up to `sample` of them (read from their
    headers, not decoded, a fixed choice) times their number, so it costs the same for any count."""
    chosen = paths if len(paths) <= sample else random.Random(0).sample(paths, sample)
    sizes = []
    for path in chosen:
        try:
            width, height = images.decoded_size(path)
            sizes.append(width * height * 3)
        except Exception:
            pass  # unreadable files are found and reported elsewhere
    return int(sum(sizes) / max(len(sizes), 1) * len(paths))


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


def cache_in_shared_folder():
    """Whether this machine's cache is a file in shared_folder() (/dev/shm): so it is for the
    processes of a torchrun on this machine, and where loader workers are spawned; a single process
    whose workers are forked keeps it in anonymous memory, which /dev/shm's size does not limit."""
    _, local_size = distributed.local_rank_and_size()
    return not (local_size == 1 and FORKED_WORKERS)


def cache_capacity(mode, paths, log=print):
    """Bytes of decoded pixels to keep in the machine's one cache (0: none). 'auto' caches when
    the images fit in half the free memory (counted once per machine, however many processes
    share it; for a cache in /dev/shm, half of what is free there if that is less), 'on' insists,
    'off' never does. A quarter more than the estimate is kept in reserve: an unused reserve takes
    no memory."""
    if mode == "off":
        return 0
    need = estimate_decoded_bytes(paths)
    free, where = available_memory_bytes(), "in memory"
    if cache_in_shared_folder():
        folder = shared_folder()
        in_folder = free_bytes(folder)
        if in_folder < free:
            free, where = in_folder, f"in {folder}, where this machine's processes share it"
    fits = need <= free // 2
    gib = 2 ** 30
    if fits:
        log(f"cache: keeping decoded images in memory as they are first loaded: about {need / gib:.2f} GiB "
            f"of {free / gib:.1f} GiB available {where}")
    elif mode == "on":
        raise UserError(f"--cache on needs about {need / gib:.1f} GiB but only {free / gib:.1f} GiB is available "
                        f"{where} (the cache may take at most half): use --cache auto or --cache off")
    else:
        log(f"cache: decoded images need about {need / gib:.1f} GiB, more than half of the {free / gib:.1f} GiB "
            f"available {where}: streaming from disk instead")
    return min(need + need // 4, free // 2) if fits else 0


def machine_cache(count, capacity, writers_per_process, device):
    """This machine's SharedImageCache for `count` images, made by its first process and opened by
    the others, and this process's first writer number in it."""
    local_rank, local_size = distributed.local_rank_and_size()
    if not cache_in_shared_folder():  # this process alone, and the loader workers it forks
        return SharedImageCache.create(count, capacity, writers_per_process), 0
    made, error = None, None
    if local_rank == 0:
        try:
            made = SharedImageCache.create(count, capacity, local_size * writers_per_process, as_file=True)
        except OSError as e:
            error = UserError(f"cannot make the image cache in {shared_folder()} ({e.strerror or e}): "
                              "free some space there, or pass --cache off")
    distributed.fail_together(error, device)
    path = distributed.from_machine_leader(made.path if made is not None else None, device)
    shared = made if made is not None else SharedImageCache.attach(path)
    distributed.barrier(device)  # every process has it open: its name can go
    if made is not None:
        made.unlink()
    elif FORKED_WORKERS:
        shared.path = None  # the leader removed it
    return shared, local_rank * writers_per_process
