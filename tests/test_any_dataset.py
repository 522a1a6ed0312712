"""Any dataset at any size: a start-up that lists instead of decoding, one shared image cache,
unreadable files found late but never silently, uneven classes, early stopping, and the inputs
that used to lose data or mislead. Offline, CPU only, generated images."""
import multiprocessing
import os
import random
import re
import signal
import socket
import tarfile
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import export
import predict
import train
from helpers import (
    COLORS,
    FP32,
    assert_clean_error,
    call,
    dataset_of,
    load,
    make_tree,
    save_image,
    stop_after_step,
    train_argv,
    write_corrupt,
    write_truncated_jpeg,
)
from inference import classify, images
from plumbing import cache
from training import data, download, metrics


# ---------------------------------------------------------------------------------------------
# the split: linear, and the very split it always gave
# ---------------------------------------------------------------------------------------------
def split_as_before(samples, classes, val_ratio, seed):
    """split_samples as it was written before it became one pass: a scan of all samples per class."""
    train_part, val_part = [], []
    for index, name in enumerate(classes):
        files = [path for path, target in samples if target == index]
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val = data.val_count(len(files), val_ratio)
        val_part.extend((path, index) for path in files[:n_val])
        train_part.extend((path, index) for path in files[n_val:])
    return sorted(train_part, key=lambda s: (s[1], s[0])), sorted(val_part, key=lambda s: (s[1], s[0]))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_samples_gives_the_split_it_always_gave(seed):
    rng = random.Random(seed)
    classes = [f"class_{k:03d}" for k in range(60)]
    samples = sorted((f"/d/{c}/{rng.random():.12f}.jpg", k) for k, c in enumerate(classes)
                     for _ in range(rng.randint(1, 40)))
    for ratio in (0.1, 0.25):
        assert data.split_samples(samples, classes, ratio, seed) == split_as_before(samples, classes, ratio, seed)


# ---------------------------------------------------------------------------------------------
# the start-up check, and images found unreadable only when decoded
# ---------------------------------------------------------------------------------------------
def test_the_cheap_check_reads_a_few_bytes_and_knows_every_format(tmp_path):
    good = []
    for ext in ("jpg", "png", "gif", "bmp", "tif", "webp", "ppm"):
        Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(tmp_path / f"ok.{ext}")
        good.append(tmp_path / f"ok.{ext}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "real.tga")
    os.rename(tmp_path / "real.tga", tmp_path / "tga.jpg")  # no signature of ours: Pillow's header check
    good.append(tmp_path / "tga.jpg")
    for path in good:
        assert images.unreadable(str(path)) is None, path
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("a shopping list, not a photo")
    write_corrupt(tmp_path / "noise.png")
    assert images.unreadable(str(tmp_path / "empty.jpg")) == "an empty file"
    for name in ("notes.jpg", "noise.png"):
        assert "UnidentifiedImageError" in images.unreadable(str(tmp_path / name))
    truncated = write_truncated_jpeg(tmp_path / "half.jpg")
    assert images.unreadable(str(truncated)) is None  # starts like a JPEG: found when decoded


def test_an_unreadable_image_is_replaced_by_the_next_one_the_same_way_every_time(tmp_path):
    root = tmp_path / "photos"
    for i in range(3):
        save_image(root / "a" / f"{i}.jpg", COLORS[0], seed=i)
    write_truncated_jpeg(root / "a" / "1x.jpg")  # sorted between 1.jpg and 2.jpg: index 2
    save_image(root / "b" / "0.jpg", COLORS[1])
    train_set = dataset_of(root, data.train_transform(32))
    assert [os.path.basename(p) for p, _ in train_set.samples] == ["0.jpg", "1.jpg", "1x.jpg", "2.jpg", "0.jpg"]
    first = train_set[(2, 99)]
    assert train_set.cache.bad_indices() == [2] and train_set.cache.found_bad
    substitute = train_set[(3, 99)]
    assert torch.equal(first[0], substitute[0]) and first[1:] == substitute[1:] == (0, True)
    assert torch.equal(train_set[(2, 99)][0], first[0])  # known now: not decoded again, the same answer
    val_set = dataset_of(root, data.EvalTransform(images.Preprocessing(40, 32)), substitute=False)
    image, target, valid = val_set[2]
    assert not valid and target == 0 and image.shape == (3, 32, 32)


def test_forked_loader_workers_fill_the_one_cache_and_report_bad_images(tmp_path):
    root = tmp_path / "photos"
    for k in range(2):
        for i in range(6):
            save_image(root / f"c{k}" / f"{i}.jpg", COLORS[k], seed=10 * k + i)
    write_truncated_jpeg(root / "c1" / "9.jpg")
    dataset = dataset_of(root, data.EvalTransform(images.Preprocessing(32, 32)), substitute=False, workers=2)
    loader = data.make_loader(dataset, data.EpochSampler(len(dataset), False), 4, 2, torch.device("cpu"))
    valid = torch.cat([v for _, _, v in loader])
    assert valid.tolist() == [True] * 12 + [False]
    cached, streamed, used = dataset.cache.counts()
    assert (cached, streamed) == (12, 0) and used == 12 * 48 * 64 * 3  # filled by the workers, seen here
    assert dataset.cache.bad_indices() == [12]
    again = torch.cat([x for x, _, _ in loader])  # the second pass reads the cache: the same pixels
    assert torch.equal(again, torch.cat([x for x, _, _ in loader]))


def test_a_full_cache_reads_the_rest_from_disk(tmp_path):
    root = tmp_path / "photos"
    for i in range(4):
        save_image(root / "a" / f"{i}.jpg", COLORS[0], seed=i)
    samples = [(str(p), 0) for p in sorted((root / "a").iterdir())]
    small = cache.SharedImageCache.create(len(samples), 2 * 48 * 64 * 3)  # room for two
    dataset = data.ImageDataset(samples, data.EvalTransform(images.Preprocessing(32, 32)), small, substitute=False)
    first = [dataset[i][0] for i in range(4)]
    assert small.counts()[:2] == (2, 2)
    assert all(torch.equal(dataset[i][0], first[i]) for i in range(4))


def _attach_worker(rank, port, results):
    try:
        os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        shared, writer = data.machine_cache(3, 3 * 1000, 1, torch.device("cpu"))
        if rank == 1:
            shared.put(1, np.full((10, 20, 3), 7, np.uint8), writer)
            shared.mark_bad(2)
        dist.barrier()
        seen = shared.get(1)
        results.put((rank, writer, None if seen is None else (seen.shape, int(seen.max())), shared.bad_indices(),
                     shared.path, sorted(f for f in os.listdir(cache.shared_folder()) if f.startswith("googlenet-cache-"))))
    except BaseException:
        results.put((rank, "crash: " + traceback.format_exc(), None, None, None, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork") or not cache.FORKED_WORKERS, reason="needs fork() and Linux")
def test_torchruns_local_processes_share_one_cache_whose_file_is_gone_once_open():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    before = sorted(f for f in os.listdir(cache.shared_folder()) if f.startswith("googlenet-cache-"))
    procs = [ctx.Process(target=_attach_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = sorted(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    for rank, writer, seen, bad, path, files in got:
        assert writer == rank, writer  # each process writes its own slab
        assert seen == ((10, 20, 3), 7) and bad == [2]  # what rank 1 wrote, rank 0 reads
        assert path is None and files == before  # unlinked: nothing is left behind


def test_resume_holds_exactly_with_an_image_found_unreadable_mid_epoch(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "data", n_train=4, n_val=2)
    truncated = write_truncated_jpeg(tree / "train" / "roses" / "roses_02b.jpg")
    argv = train_argv(tree, tmp_path / "A", "--image-size", 48)
    assert call(train, argv)[0] == 0
    reference = load(tmp_path / "A" / "last.pth")
    assert reference["bad_images"] == [str(truncated)]
    out, saved = tmp_path / "B", tmp_path / "after_step_3.pth"
    argv = train_argv(tree, out, "--image-size", 48)
    with monkeypatch.context() as m:
        m.setattr(train.StopRequest, "check", stop_after_step(4, out, saved))
        assert call(train, argv + ["--save-every", "1"])[0] == 128 + signal.SIGTERM
    code, stdout, err = call(train, argv + ["--resume", saved])
    assert code == 0, err
    resumed = load(out / "last.pth")
    assert resumed["bad_images"] == reference["bad_images"]
    assert all(torch.equal(resumed["model"][k], reference["model"][k]) for k in reference["model"])


# ---------------------------------------------------------------------------------------------
# uneven classes
# ---------------------------------------------------------------------------------------------
def test_balanced_accuracy_and_macro_f1_by_hand():
    confusion = torch.tensor([[8, 2, 0], [1, 1, 0], [0, 0, 0]])  # a class with no images and no predictions
    scores = metrics.summary_scores(confusion)
    assert scores["accuracy"] == pytest.approx(9 / 12)
    assert scores["balanced_accuracy"] == pytest.approx((8 / 10 + 1 / 2) / 2)
    f1_a, f1_b = 2 * (8 / 9) * 0.8 / (8 / 9 + 0.8), 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)
    assert scores["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """40 images of one class and 4 of another (10:1), 10 of each to validate on."""
    root = tmp_path_factory.mktemp("uneven")
    for split, counts in (("train", (40, 4)), ("val", (10, 10))):
        for k, (name, n) in enumerate(zip(("many", "few"), counts)):
            for i in range(n):
                save_image(root / split / name / f"{i:03d}.jpg", COLORS[k], seed=k * 1000 + i + (500 if split == "val" else 0))
    return root


def minority_recall(uneven, out, *extra):
    # 5 epochs: after 3, the class-weighted run beat the plain one on an AVX2 CPU but not on an AVX-512
    # one (0.0 both; fp32 both, the kernels differ); after 5 it is 1.0 there, the plain run's still 0.0
    argv = train_argv(uneven, out, "--image-size", 32, "--no-model-ema", "--warmup-epochs", 0, *extra, epochs=5)
    code, _, err = call(train, argv)
    assert code == 0, err
    code, stdout, err = call(train, [*FP32, "--eval-only", "--weights", out / "last.pth", "--data-path", uneven,
                                     "--output-dir", out / "eval", "--device", "cpu"])
    assert code == 0, err
    (row,) = [line.split() for line in stdout.splitlines() if line.startswith("few ")][:1]
    return float(row[2])


def test_either_balancing_option_raises_the_small_classs_recall(uneven, tmp_path):
    plain = minority_recall(uneven, tmp_path / "plain")
    weighted = minority_recall(uneven, tmp_path / "weights", "--class-weights", "balanced")
    sampled = minority_recall(uneven, tmp_path / "sampler", "--sampler", "balanced")
    assert plain < 0.5 and weighted > plain and sampled > plain, (plain, weighted, sampled)


def test_the_balanced_sampler_draws_classes_evenly_and_exactly_again():
    targets = [0] * 90 + [1] * 10
    sampler = data.EpochSampler(100, True, seed=3, weights=data.balanced_draws(targets))
    sampler.set_epoch(0)
    drawn = list(sampler)
    assert len(drawn) == 100 and 35 <= sum(targets[i] for i, _ in drawn) <= 65  # about half from class 1
    assert len({seed for _, seed in drawn}) == 100  # a sample drawn twice is augmented two ways
    sampler.set_epoch(0, skip=40)
    assert list(sampler) == drawn[40:]  # the same epoch again, resumed after 40 samples
    halves = [data.EpochSampler(100, True, 3, rank, 2, weights=data.balanced_draws(targets)) for rank in (0, 1)]
    assert sorted(list(halves[0]) + list(halves[1])) == sorted(drawn)  # split over 2 processes
    sampler.set_epoch(1)
    assert list(sampler) != drawn


def test_best_metric_chooses_what_best_pth_keeps(uneven, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = call(train, train_argv(uneven, out, "--image-size", 32, "--best-metric", "macro_f1",
                                               "--no-model-ema", "--warmup-epochs", 0, epochs=3))
    assert code == 0, err
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("val_macro_f1")
    scores = [float(r[column]) for r in rows[1:]]
    best = load(out / "best.pth")
    assert best["epoch"] == 1 + scores.index(max(scores))
    assert best["val_scores"]["macro_f1"] == pytest.approx(max(scores), abs=1e-5)
    assert f"best val_macro_f1 {max(scores):.3f} at epoch {best['epoch']}" in stdout


# ---------------------------------------------------------------------------------------------
# stopping when it stops improving
# ---------------------------------------------------------------------------------------------
def test_patience_ends_the_run_says_why_and_stays_ended_on_resume(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "out"
    argv = train_argv(tree, out, "--image-size", 32, "--lr", "1e-12", "--patience", 2, epochs=6)  # nothing improves
    code, stdout, err = call(train, argv)
    assert code == 0, err
    line = [l for l in stdout.splitlines() if l.startswith("stopping early")]
    assert line == ["stopping early after epoch 3: val accuracy has not improved for 2 epochs (--patience 2; "
                    f"best {load(out / 'best.pth')['val_accuracy']:.3f} at epoch 1); the cosine schedule was "
                    "planned for 6 epochs"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert load(out / "last.pth")["epoch"] == 3 and load(out / "best.pth")["epoch"] == 1
    code, stdout, err = call(train, argv + ["--resume", out / "last.pth"])
    assert code == 0 and "stopping early after epoch 3" in stdout and "train 4/6" not in stdout


# ---------------------------------------------------------------------------------------------
# inputs that used to lose data or mislead
# ---------------------------------------------------------------------------------------------
def test_a_folder_that_holds_a_run_is_not_written_over(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=1, n_val=1)
    out = tmp_path / "out"
    assert call(train, train_argv(tree, out, "--image-size", 32))[0] == 0
    kept = (out / "best.pth").read_bytes()
    code, _, err = call(train, train_argv(tree, out, "--image-size", 32, "--seed", 1))
    assert_clean_error(code, err, f"{out} already holds a run", "--resume", "--output-dir", "--overwrite")
    assert (out / "best.pth").read_bytes() == kept
    code, _, err = call(train, train_argv(tree, out, "--image-size", 32, "--seed", 1, "--overwrite"))
    assert code == 0, err
    assert (out / "best.pth").read_bytes() != kept


def test_download_never_deletes_a_flower_photos_folder_it_did_not_make(tmp_path):
    dest = tmp_path / "flower_data"
    mine = dest / "flower_photos" / "my_notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    with pytest.raises(data.DataError, match="already exists: split it with"):
        download.download_flowers(str(dest), url=str(tmp_path / "never_read.tgz"), sha256=None, log=lambda *a: None)
    assert mine.read_text() == "keep me" and sorted(os.listdir(dest)) == ["flower_photos"]


def test_an_archive_that_escapes_its_folder_is_one_line(tmp_path):
    evil = tmp_path / "flower_photos.tgz"
    payload = tmp_path / "payload.txt"
    payload.write_text("outside")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="flower_photos/../../escaped.txt")
    import hashlib

    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    code, _, err = call(train, ["--download", "--data-url", evil, "--data-sha256", sha,
                                *train_argv(tmp_path / "flower_data", tmp_path / "out")])
    assert_clean_error(code, err, "cannot extract", "not the flower photos archive")
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(os.listdir(tmp_path / "flower_data")) == ["flower_photos.tgz"]  # no half-extracted folder


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    tree = make_tree(root / "data", n_train=1, n_val=1)
    assert call(train, train_argv(tree, root / "out", "--image-size", 32))[0] == 0
    best = load(root / "out" / "best.pth")
    best["model"]["inception4a.branch1.conv.weight"][0, 0, 0, 0] = float("nan")
    best["model"]["fc.bias"][1] = float("inf")
    broken = root / "diverged.pth"
    torch.save(best, broken)
    return {"tree": tree, "weights": broken, "root": root}


def test_weights_with_nan_or_inf_are_refused_everywhere(nan_weights, tmp_path):
    weights, tree = nan_weights["weights"], nan_weights["tree"]
    image = next((tree / "val").rglob("*.jpg"))
    code, _, err = call(predict, [*FP32, image, "--weights", weights])
    assert_clean_error(code, err, str(weights), "NaN or infinite", "fc.bias", "inception4a.branch1.conv.weight")
    code, _, err = call(train, [*FP32, "--eval-only", "--weights", weights, "--data-path", tree, "--output-dir",
                                tmp_path / "ev", "--device", "cpu"])
    assert_clean_error(code, err, str(weights), "NaN or infinite")
    code, _, err = call(train, train_argv(tree, tmp_path / "ft", "--weights", weights))
    assert_clean_error(code, err, str(weights), "NaN or infinite")
    pytest.importorskip("onnxscript")
    code, _, err = call(export, ["--weights", weights, "--output", tmp_path / "x.onnx"])
    assert_clean_error(code, err, str(weights), "NaN or infinite")
    assert not (tmp_path / "x.onnx").exists()


def test_a_link_to_a_parent_folder_is_entered_once(tmp_path):
    root = tmp_path / "photos"
    for k, name in enumerate(("daisy", "roses")):
        for i in range(4):
            save_image(root / name / f"{i}.jpg", COLORS[k], seed=i)
    os.symlink("..", root / "daisy" / "loop")  # daisy/loop/daisy/loop/... would never end
    other = tmp_path / "more_roses"
    save_image(other / "extra.jpg", COLORS[1])
    os.symlink(other, root / "roses" / "linked")  # a link to a folder of photos is followed
    samples = data.list_images(str(root), ["daisy", "roses"])
    names = [(os.path.relpath(p, root), k) for p, k in samples]
    assert len(samples) == 9 and sum(k == 0 for _, k in samples) == 4, names
    assert (os.path.join("roses", "linked", "extra.jpg"), 1) in names
    assert len(classify.collect_images([str(root)])) == 9


@pytest.mark.parametrize("side", ["val", "train"])
def test_a_split_whose_train_and_val_classes_differ_is_refused(side, tmp_path):
    tree = make_tree(tmp_path / "data", n_train=1, n_val=1)
    save_image(tree / side / "lilies" / "0.jpg", COLORS[3])
    code, _, err = call(train, train_argv(tree, tmp_path / "out"))
    other = "train" if side == "val" else "val"
    line = assert_clean_error(code, err, "class lilies", str(tree / side), f"none in {tree / other}")
    assert re.search("never|would never", line)
