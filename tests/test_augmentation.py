"""The training transforms (training/data.py's train_transform) and the batch mixing (MixUp,
CutMix): which of torchvision's tools each option selects, and that every random draw is seeded per
image (or, for the batch mixing, by the global generator that last.pth saves), so a resumed run
augments exactly as the uninterrupted one."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as transforms_v2

from helpers import dataset_of
from training import data

pytestmark = pytest.mark.quick


def photo(seed=0, size=(160, 120)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("policy", [None, *sorted(data.AUTO_AUGMENT)])
def test_augmentation_is_seeded_per_image_and_by_the_seed_only(policy, tmp_path):
    transform = data.train_transform(64, auto_augment=policy)
    policies = [t for t in transform.transforms if type(t) in data.AUTO_AUGMENT.values()]
    assert [type(t) for t in policies] == ([data.AUTO_AUGMENT[policy]] if policy else [])
    for i in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        photo(i).save(tmp_path / "a" / f"{i}.png")
    ds = dataset_of(tmp_path, transform)
    first = ds[(0, 11)][0]
    assert first.shape == (3, 64, 64) and first.dtype == torch.uint8
    torch.manual_seed(123)  # the global generator (dropout's) neither matters nor is consumed
    state = torch.get_rng_state()
    assert torch.equal(ds[(0, 11)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not all(torch.equal(ds[(0, s)][0], first) for s in range(12, 16))


def test_random_erase_paints_a_grey_rectangle():
    image = Image.fromarray(np.zeros((100, 100, 3), np.uint8))  # black: the erased part stands out
    torch.manual_seed(0)
    erased = data.train_transform(64, random_erase=1.0)(image)
    grey = (erased == data.ERASE_VALUE).all(dim=0)
    assert grey.any() and not grey.all()
    rows, cols = grey.any(dim=1).nonzero(), grey.any(dim=0).nonzero()
    box = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one filled rectangle
    assert (data.train_transform(64, random_erase=0.0)(image) == 0).all()


def test_mixup_and_cutmix_options_select_torchvisions_tools():
    assert data.build_batch_mix(0.0, 0.0, 5) is None  # off: the targets stay class indices
    mixup = data.build_batch_mix(0.2, 0.0, 5)
    assert type(mixup) is transforms_v2.MixUp and (mixup.alpha, mixup.num_classes) == (0.2, 5)
    cutmix = data.build_batch_mix(0.0, 1.0, 5)
    assert type(cutmix) is transforms_v2.CutMix and (cutmix.alpha, cutmix.num_classes) == (1.0, 5)
    both = data.build_batch_mix(0.2, 1.0, 5)  # one of the two per batch
    assert type(both) is transforms_v2.RandomChoice
    assert [(type(t), t.alpha) for t in both.transforms] == [(transforms_v2.MixUp, 0.2), (transforms_v2.CutMix, 1.0)]


def test_the_batch_mix_draws_from_the_global_generator():
    """What last.pth saves (torch's global RNG state) decides the mix: the same state, the same batch."""
    mix = data.build_batch_mix(0.2, 1.0, 5)
    images = torch.randn(6, 3, 16, 16).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(0)
    first, targets = mix(images, labels)
    assert first.shape == images.shape and targets.shape == (6, 5)
    torch.manual_seed(0)
    again, same_targets = mix(images, labels)
    assert torch.equal(first, again) and torch.equal(targets, same_targets)
    assert not all(torch.equal(mix(images, labels)[1], targets) for _ in range(3))  # a new draw each batch
