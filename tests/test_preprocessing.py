"""The evaluation preprocessing and the normalisation: inference/images.py's Pillow and numpy path
(validation, predict.py, the .onnx files and the demo page share it) and training/data.py's batch
normalisation on the device give what torchvision's transforms give, exactly."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from inference import images
from training import data

pytestmark = pytest.mark.quick


def test_batch_normalisation_equals_totensor_normalize():
    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
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
    """images.py's Pillow/numpy preprocessing gives what torchvision's Resize((s, s)), CenterCrop
    and ToTensor + Normalize gave, exactly: as a numpy array (predict.py, .onnx), as the
    EvalTransform of validation, and normalised either way."""
    rng = np.random.default_rng(size)
    preprocessing = images.Preprocessing(resize, crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    classic = transforms.Compose([transforms.Resize((resize, resize)), transforms.CenterCrop(crop),
                                  transforms.PILToTensor()])
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((size, size + 33), (97, 61))]
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
