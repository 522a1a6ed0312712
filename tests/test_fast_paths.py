"""Every fast path gives the plain path's results (timings live in benchmarks/, never here)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import data
import device as dev
from model import GoogLeNet


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
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(3)]
    classic = transforms.Compose([transforms.ToTensor(), transforms.Normalize(data.MEAN, data.STD)])
    expected = torch.stack([classic(im) for im in images])
    batch = torch.stack([transforms.PILToTensor()(im) for im in images])
    for channels_last in (False, True):
        got = data.normalize_batch(batch, channels_last=channels_last)
        assert got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_cached_and_streamed_images_are_the_same(tmp_path):
    root = photo_folder(tmp_path / "imgs")
    for train in (True, False):
        tf = data.build_transforms(train=train)
        cached = data.FlowerFolder(str(root), tf, cache=True)
        streamed = data.FlowerFolder(str(root), tf, cache=False)
        items = [(i, 1234 + i) for i in range(len(cached))] if train else range(len(cached))
        for item in items:
            (x1, y1), (x2, y2) = cached[item], streamed[item]
            assert y1 == y2 and torch.equal(x1, x2)


def test_seeded_augmentation_depends_on_the_seed_only(tmp_path):
    root = photo_folder(tmp_path / "imgs")
    ds = data.FlowerFolder(str(root), data.build_transforms(train=True), cache=True)
    first = ds[(0, 7)][0]
    torch.manual_seed(999)  # the global RNG (dropout's) must neither matter nor be consumed
    state = torch.get_rng_state()
    assert torch.equal(ds[(0, 7)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not all(torch.equal(ds[(0, s)][0], first) for s in range(8, 12))


def test_draft_decoding_only_touches_large_jpegs(tmp_path):
    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(small)
    assert data.load_image(str(small)).size == (400, 300)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((2000, 3000, 3), 128, np.uint8)).save(big)
    w, h = data.load_image(str(big)).size
    assert min(w, h) >= data.DECODE_MIN_SIDE and (w, h) == (1500, 1000)


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
    assert data.default_workers(32, cpu, cached=True) == 0
    assert data.default_workers(32, torch.device("cuda"), cached=True) == min(os.cpu_count(), 8)


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


def test_cuda_backend_settings():
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dev.tune_backends(torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        dev.tune_backends(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_loader_pins_memory_only_for_cuda(tmp_path):
    ds = data.FlowerFolder(str(photo_folder(tmp_path / "imgs")), data.build_transforms(train=False))
    sampler = data.EpochSampler(len(ds), shuffle=False)
    assert data.make_loader(ds, sampler, 2, 0, torch.device("cuda")).pin_memory
    assert not data.make_loader(ds, sampler, 2, 0, torch.device("cpu")).pin_memory


def test_cuda_device_choice(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert dev.pick_device("auto") == torch.device("cuda")
    assert dev.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)  # torchrun's LOCAL_RANK
    assert dev.pick_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # asked for by name
    assert chosen == [torch.device("cuda"), torch.device("cuda", 1), torch.device("cuda", 0)]
    with pytest.raises(dev.DeviceError, match="2 GPU"):
        dev.pick_device("cuda:2")


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
def test_fused_optimizer_steps_like_the_per_tensor_loop(opt):
    import train

    torch.manual_seed(0)
    model = GoogLeNet(num_classes=3, init_weights=True)
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
    args = train.get_args_parser().parse_args(["--opt", opt, "--lr", "1e-3", "--weight-decay", "0.01"])
    fused = train.build_optimizer(args, fast)
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
