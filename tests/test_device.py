"""Every fast path gives the plain path's results (timings live in benchmarks/, never here)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from helpers import dataset_of
from inference import images
from model import GoogLeNet
from plumbing import device as dev
from training import data, recipe


def photo_folder(root, count=3):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (120 + 7 * i, 160, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)
    return root


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def test_batch_normalisation_equals_totensor_normalize():
    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(3)]
    classic = transforms.Compose([transforms.ToTensor(), transforms.Normalize(images.MEAN, images.STD)])
    expected = torch.stack([classic(im) for im in photos])
    batch = torch.stack([transforms.PILToTensor()(im) for im in photos])
    for channels_last in (False, True):
        got = data.normalize_batch(batch, channels_last=channels_last)
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,resize,crop", [(224, 224, 224), (96, 144, 128), (64, 81, 80), (50, 37, 37)])
def test_evaluation_preprocessing_is_torchvisions_pixel_for_pixel(size, resize, crop):
    """images.py's Pillow/numpy preprocessing (shared by validation, predict.py and the .onnx path)
    gives what torchvision's Resize((s, s)), CenterCrop and ToTensor + Normalize gave, exactly."""
    rng = np.random.default_rng(size)
    preprocessing = images.Preprocessing(resize, crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    classic = transforms.Compose([transforms.Resize((resize, resize)), transforms.CenterCrop(crop),
                                  transforms.PILToTensor()])
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((size, size + 33), (97, 61))]
    for photo in photos:
        pixels = images.resize_and_crop(photo, preprocessing)
        assert pixels.dtype == np.uint8 and pixels.shape == (crop, crop, 3)
        assert np.array_equal(pixels, classic(photo).permute(1, 2, 0).numpy())
        assert torch.equal(data.EvalTransform(preprocessing)(photo), classic(photo))
    batch = np.stack([images.resize_and_crop(p, preprocessing) for p in photos])
    expected = data.normalize_batch(torch.from_numpy(batch).permute(0, 3, 1, 2), preprocessing.mean, preprocessing.std)
    got = images.normalize(batch, preprocessing)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, expected.numpy())


def test_cached_and_streamed_images_are_the_same(tmp_path):
    root = photo_folder(tmp_path / "imgs")
    for tf in (data.train_transform(224), data.EvalTransform(images.Preprocessing(224, 224))):
        cached = dataset_of(root, tf, cached=True)
        streamed = dataset_of(root, tf, cached=False)
        train = not isinstance(tf, data.EvalTransform)
        items = [(i, 1234 + i) for i in range(len(cached))] if train else range(len(cached))
        for item in items:
            for _ in range(2):  # the first access decodes (and caches), the second reads the cache
                (x1, y1, ok1), (x2, y2, ok2) = cached[item], streamed[item]
                assert y1 == y2 and ok1 and ok2 and torch.equal(x1, x2)
    assert cached.cache.counts()[0] == len(cached) and streamed.cache.counts()[:2] == (0, len(streamed))


def test_seeded_augmentation_depends_on_the_seed_only(tmp_path):
    root = photo_folder(tmp_path / "imgs")
    ds = dataset_of(root, data.train_transform(224))
    first = ds[(0, 7)][0]
    torch.manual_seed(999)  # the global RNG (dropout's) must neither matter nor be consumed
    state = torch.get_rng_state()
    assert torch.equal(ds[(0, 7)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not all(torch.equal(ds[(0, s)][0], first) for s in range(8, 12))


def test_draft_decoding_only_touches_large_jpegs(tmp_path):
    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(small)
    assert images.load_image(str(small)).size == (400, 300)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((2000, 3000, 3), 128, np.uint8)).save(big)
    w, h = images.load_image(str(big)).size
    assert min(w, h) >= images.DECODE_MIN_SIDE and (w, h) == (1500, 1000)


def test_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, init_weights=True)
    model.train()
    # dropout draws different masks for different chunkings, so it is off for this comparison
    for dropout in (model.dropout, model.aux1.dropout, model.aux2.dropout):
        dropout.p = 0.0
    x, y = torch.randn(4, 3, 224, 224), torch.tensor([0, 1, 2, 1])
    loss_fn = torch.nn.CrossEntropyLoss()

    def grads(chunk):
        model.zero_grad(set_to_none=True)
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            logits, aux2, aux1 = model(xs)
            loss = loss_fn(logits, ys) + 0.3 * (loss_fn(aux1, ys) + loss_fn(aux2, ys))
            (loss * len(xs) / len(x)).backward()
        return [p.grad.clone() for p in model.parameters()]

    for full, micro in zip(grads(4), grads(2)):
        assert relative_error(micro, full) < 1e-4


def test_channels_last_training_step_matches_nchw():
    torch.manual_seed(0)
    plain = GoogLeNet(num_classes=3, init_weights=True)
    fast = GoogLeNet(num_classes=3)
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([0, 2])
    for model, inputs in ((plain, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        model.eval()  # no dropout: both see the same function
        torch.nn.functional.cross_entropy(model(inputs), y).backward()
    # Both are fp32 sums in different orders: against an fp64 reference each is off by up to ~5e-3
    # (relative norm) in conv1's gradient, which is large at this initialisation.
    for p, q in zip(plain.parameters(), fast.parameters()):
        if p.grad is not None:
            assert relative_error(q.grad, p.grad) < 1e-2


def test_cpu_without_native_bf16_runs_fp32_and_the_cuda_only_pieces_are_off():
    cpu = torch.device("cpu")
    assert dev.amp_dtype(cpu, "auto", cpu_flags=[]) is None
    with pytest.raises(dev.DeviceError):
        dev.amp_dtype(cpu, "fp16")
    with dev.autocast(cpu, None):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = torch.tensor(2.0, requires_grad=True)
    assert scaler.scale(loss) is loss  # disabled: no scaling, step is the plain optimizer step
    assert images.default_workers("cpu", 32, cached=True) == 0
    assert images.default_workers("cpu", 32, items=1) == 0  # one photo: nothing to overlap
    assert images.default_workers("cpu", 32) == min(1, os.cpu_count() - 1)
    assert images.default_workers("cuda", 32, cached=True) == min(os.cpu_count(), 8)


def test_allocator_setting_keeps_results(tmp_path):
    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, aux_logits=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        before = model(x)
        dev.tune_cpu_allocator()
        after = model(x)
    assert torch.equal(before, after)


# The CUDA-only choices, checked on a machine without a GPU: each decision is made from the device
# and the precision alone, so it can be asked for a torch.device("cuda") that nothing runs on.
def test_cuda_precision_choice(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.amp_dtype(cuda, "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert dev.amp_dtype(cuda, "auto") is torch.float16
    assert dev.amp_dtype(cuda, "bf16") is torch.bfloat16
    assert dev.amp_dtype(cuda, "fp16") is torch.float16
    assert dev.amp_dtype(cuda, "off") is None


def test_only_fp16_gets_a_loss_scaler():
    cpu = torch.device("cpu")  # the CPU's GradScaler behaves as CUDA's does, and exists here
    assert dev.grad_scaler(cpu, torch.float16).is_enabled()
    assert not dev.grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not dev.grad_scaler(cpu, None).is_enabled()


def test_loader_pins_memory_only_for_cuda(tmp_path):
    ds = dataset_of(photo_folder(tmp_path / "imgs"), data.EvalTransform(images.Preprocessing(224, 224)))
    sampler = data.EpochSampler(len(ds), shuffle=False)
    assert data.make_loader(ds, sampler, 2, 0, torch.device("cuda")).pin_memory
    assert not data.make_loader(ds, sampler, 2, 0, torch.device("cpu")).pin_memory


def test_cuda_device_choice(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dev.pick_device("auto") == torch.device("cuda")
    assert dev.pick_device("cuda:1") == torch.device("cuda", 1)  # asked for by name, one process
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dev.pick_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # torchrun of one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dev.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert dev.pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda"), torch.device("cuda", 1), torch.device("cuda", 1), torch.device("cuda", 1),
                      torch.device("cuda", 1)]
    # by name with several processes: every process would take GPU 0
    with pytest.raises(dev.DeviceError, match=r"^--device cuda:0 with 2 processes \(torchrun\): each process takes "
                                              "the GPU of its LOCAL_RANK; pass --device cuda"):
        dev.pick_device("cuda:0", local_rank=1)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(dev.DeviceError, match="2 GPU"):
        dev.pick_device("cuda:2")
    assert len(chosen) == 5


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_fused_optimizer_steps_like_the_per_tensor_loop(opt):
    import train

    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, init_weights=True)
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
    args = train.get_args_parser().parse_args(["--opt", opt, "--lr", "1e-3", "--weight-decay", "0.01"])
    fused = recipe.build_optimizer(args, fast)
    assert fused.defaults["fused"]
    loop_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[opt]
    extra = {"momentum": args.momentum} if opt == "sgd" else {}
    loop = loop_class(plain, lr=1e-3, weight_decay=0.01, foreach=False, **extra)
    for _ in range(3):
        for a, b in zip(plain, fast):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        loop.step()
        fused.step()
    for a, b in zip(plain, fast):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
