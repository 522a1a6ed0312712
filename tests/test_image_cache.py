"""The decoded-image cache (training/image_cache.py) behind training/data.py's ImageDataset: it gives the
pixels a fresh decode gives, reads from disk what does not fit, is filled by forked loader workers
and shared by torchrun's processes on one machine (whose file is gone once all have it open). How
large it may be: test_cache_sizing.py."""
import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from helpers import COLORS, dataset_of, run_ranks, save_image, write_truncated_jpeg
from inference import images
from training import data, image_cache


def photo_folder(root, count=3):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (120 + 7 * i, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


@pytest.mark.quick
def test_cached_and_streamed_images_are_the_same(tmp_path):
    root = photo_folder(tmp_path / "imgs")
    for tf in (data.train_transform(64), data.EvalTransform(images.Preprocessing(64, 64))):
        cached = dataset_of(root, tf, cached=True)
        streamed = dataset_of(root, tf, cached=False)
        train = not isinstance(tf, data.EvalTransform)
        items = [(i, 1234 + i) for i in range(len(cached))] if train else range(len(cached))
        for item in items:
            for _ in range(2):  # the first access decodes (and caches), the second reads the cache
                (x1, y1, ok1), (x2, y2, ok2) = cached[item], streamed[item]
                assert y1 == y2 and ok1 and ok2 and torch.equal(x1, x2)
    assert cached.cache.counts()[0] == len(cached) and streamed.cache.counts()[:2] == (0, len(streamed))


@pytest.mark.quick
def test_a_full_cache_reads_the_rest_from_disk(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        save_image(root / "a" / f"{i}.jpg", COLORS[0], seed=i)
    samples = [(str(p), 0) for p in sorted((root / "a").iterdir())]
    small = image_cache.SharedImageCache.create(len(samples), 2 * 48 * 64 * 3)  # room for two
    dataset = data.ImageDataset(samples, data.EvalTransform(images.Preprocessing(32, 32)), small, substitute=False)
    first = [dataset[i][0] for i in range(4)]
    assert small.counts()[:2] == (2, 2)
    assert all(torch.equal(dataset[i][0], first[i]) for i in range(4))


def test_forked_loader_workers_fill_the_one_cache_and_report_bad_images(tmp_path):
    root = tmp_path / "photos"
    for k in range(2):
        for i in range(6):
            save_image(root / f"c{k}" / f"{i}.jpg", COLORS[k], seed=10 * k + i)
    write_truncated_jpeg(root / "c1" / "9.jpg")
    dataset = dataset_of(root, data.EvalTransform(images.Preprocessing(32, 32)), substitute=False, workers=2)
    loader = data.make_loader(dataset, data.EpochSampler(len(dataset), False), 4, 2, torch.device("cpu"))
    decoded = list(loader)  # the workers decode and fill the cache
    assert torch.cat([v for _, _, v in decoded]).tolist() == [True] * 12 + [False]
    cached, streamed, used = dataset.cache.counts()
    assert (cached, streamed) == (12, 0) and used == 12 * 48 * 64 * 3  # filled by the workers, seen here
    assert dataset.cache.bad_indices() == [12]
    again = torch.cat([x for x, _, _ in loader])  # the second pass reads the cache: the same pixels
    assert torch.equal(again, torch.cat([x for x, _, _ in decoded]))


def _attach_worker(rank, port, results):
    try:
        os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        shared, writer = image_cache.machine_cache(3, 3 * 1000, 1, torch.device("cpu"))
        if rank == 1:
            shared.put(1, np.full((10, 20, 3), 7, np.uint8), writer)
            shared.mark_bad(2)
        dist.barrier()
        seen = shared.get(1)
        files = sorted(f for f in os.listdir(image_cache.shared_folder()) if f.startswith("googlenet-cache-"))
        results.put((rank, writer, None if seen is None else (seen.shape, int(seen.max())), shared.bad_indices(),
                     shared.path, files))
    except BaseException:
        results.put((rank, "crash: " + traceback.format_exc(), None, None, None, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork") or not image_cache.FORKED_WORKERS, reason="needs fork() and Linux")
def test_torchruns_local_processes_share_one_cache_whose_file_is_gone_once_open():
    before = sorted(f for f in os.listdir(image_cache.shared_folder()) if f.startswith("googlenet-cache-"))
    got = run_ranks(_attach_worker)
    for rank, writer, seen, bad, path, files in got:
        assert writer == rank, writer  # each process writes its own slab
        assert seen == ((10, 20, 3), 7) and bad == [2]  # what rank 1 wrote, rank 0 reads
        assert path is None and files == before  # unlinked: nothing is left behind
