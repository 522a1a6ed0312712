"""inference/images.py's one image loader and its start-up check: every file becomes upright RGB
(EXIF orientation, grayscale, palette, RGBA, CMYK, 16 bits), large JPEGs are decoded at a reduced
scale, and the cheap check reads a few bytes of each file. Training, predict.py and the page all
read images through it."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import COLORS, dataset_of, save_image, write_corrupt, write_truncated_jpeg
from inference import classify, images
from training import data

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("name,mode", [("gray.png", "L"), ("palette.png", "P"), ("alpha.png", "RGBA"),
                                       ("cmyk.jpg", "CMYK"), ("gray.jpg", "L"), ("rgb.jpg", "RGB")])
def test_every_mode_is_read_as_rgb_by_training_and_prediction(name, mode, tmp_path):
    path = save_image(tmp_path / "photos" / "a" / name, COLORS[1], mode=mode)
    image = images.load_image(str(path))
    assert image.mode == "RGB" and image.size == (64, 48)
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(0)
    if mode not in ("L", "CMYK"):  # the colour survives (greys have none; CMYK converts approximately)
        assert green > red + 50 and green > blue + 50
    preprocessing = images.Preprocessing(40, 32)
    x, target, valid = dataset_of(tmp_path / "photos", data.EvalTransform(preprocessing), substitute=False)[0]
    assert valid and x.shape == (3, 32, 32)
    pixels, error = classify.prepare(str(path), preprocessing)
    assert error == "" and torch.equal(torch.from_numpy(pixels).permute(2, 0, 1), x)


def test_sixteen_bit_photos_are_read_as_their_eight_bit_selves(tmp_path):
    values = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # stored with 16 bits
    read = np.asarray(images.load_image(str(tmp_path / "deep.png")))
    assert read.shape == (40, 60, 3) and np.array_equal(read[..., 0], read[..., 2])
    assert np.abs(read[..., 0].astype(int) - (values // 257)).max() <= 1  # scaled, not clipped at 255


def test_draft_decoding_only_touches_large_jpegs(tmp_path):
    small = tmp_path / "small.jpg"
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(small)
    assert images.load_image(str(small)).size == (400, 300)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((2000, 3000, 3), 128, np.uint8)).save(big)
    w, h = images.load_image(str(big)).size
    assert min(w, h) >= images.DECODE_MIN_SIDE and (w, h) == (1500, 1000)
    assert images.decoded_size(str(big)) == (1500, 1000)  # known from the header, without decoding


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------
def sideways_photo(path, size=(60, 40)):
    """An upright picture (red top half, blue bottom half) stored rotated by 90 degrees, with the
    EXIF orientation 6 ("rotate 90 clockwise to view") that a phone writes for it."""
    w, h = size
    upright = np.zeros((h, w, 3), np.uint8)
    upright[: h // 2] = (255, 0, 0)
    upright[h // 2:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # h wide, w high
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif, quality=95)
    return path


def assert_upright(image, size):
    pixels = np.asarray(image).astype(int)
    assert image.size == size
    h = size[1]
    assert pixels[: h // 4, :, 0].mean() > 200 and pixels[: h // 4, :, 2].mean() < 50  # red on top
    assert pixels[-h // 4:, :, 2].mean() > 200 and pixels[-h // 4:, :, 0].mean() < 50  # blue below


def test_a_sideways_photo_is_read_upright(tmp_path):
    path = sideways_photo(tmp_path / "phone.jpg")
    with Image.open(path) as raw:
        assert raw.size == (40, 60)  # as stored
    assert_upright(images.load_image(str(path)), (60, 40))


def test_upright_with_draft_decoding_of_a_large_photo(tmp_path):
    path = sideways_photo(tmp_path / "big.jpg", size=(3000, 2000))
    image = images.load_image(str(path))
    assert_upright(image, (1500, 1000))  # halved by the JPEG draft, then turned
    assert min(image.size) >= images.DECODE_MIN_SIDE


def test_cache_stream_and_prediction_all_see_it_upright(tmp_path):
    path = sideways_photo(tmp_path / "photos" / "a" / "phone.jpg", size=(96, 64))
    preprocessing = images.Preprocessing(64, 64)
    transform = data.EvalTransform(preprocessing)
    cached = dataset_of(tmp_path / "photos", transform, cached=True)
    streamed = dataset_of(tmp_path / "photos", transform, cached=False)
    assert torch.equal(cached[0][0], streamed[0][0])
    assert_upright(Image.fromarray(cached.cache.get(0)), (96, 64))
    pixels, error = classify.prepare(str(path), preprocessing)
    assert error == "" and torch.equal(torch.from_numpy(pixels).permute(2, 0, 1), cached[0][0])


# ---------------------------------------------------------------------------------------------
# the start-up check
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
    assert images.unreadable(str(tmp_path / "missing.jpg")).startswith("FileNotFoundError")
