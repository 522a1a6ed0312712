"""What the network sees, drawn: Grad-CAM heat maps, a layer's feature maps, conv1's filters.

    python predict.py tulip.jpg --cam cams/                           # where the evidence for a class lies
    python predict.py tulip.jpg --cam cams/ --cam-class roses --cam-layer inception4e
    python report.py --weights weights/best.pth --feature-maps tulip.jpg --layer inception3a
    python report.py --weights weights/best.pth --filters              # conv1's 7x7 kernels

Grad-CAM (Selvaraju et al., 2017) is captum's LayerGradCam (PyTorch's interpretability library,
an optional dependency): the gradients of the class score, averaged over each channel of a
layer's output, weight that output's channels, and the positive part of the sum is the heat map,
upsampled to the image. torch is imported by the functions that use it: predict.py reads LAYERS
for its --help, and a .onnx prediction never imports torch.
"""
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from inference import images as imgs
from plumbing.atomic import atomic_write
from plumbing.options import UserError

# the layers whose outputs are spatial maps; the last Inception block is the default, as in the paper's
# CAM; earlier blocks give finer maps from smaller receptive fields
LAYERS = ("conv1", "conv2", "conv3", "inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
          "inception4d", "inception4e", "inception5a", "inception5b")
MISSING = "Grad-CAM needs captum, an optional dependency: pip install captum"


class CamError(UserError):
    """A picture that cannot be drawn: the message says what to do."""


def grad_cam(model, images, targets, layer="inception5b"):
    """Heat maps N x H x W in [0, 1] (each scaled by its own maximum) for the classes in targets.

    images: normalised N x 3 x H x W; model: eval mode, without aux heads.
    """
    import torch

    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise CamError(MISSING) from None
    with torch.enable_grad():
        maps = LayerGradCam(model, getattr(model, layer)).attribute(images, target=targets, relu_attributions=True)
        maps = LayerAttribution.interpolate(maps, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    maps = maps.detach()[:, 0].clamp_min(0)
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


def overlay(image, heat, caption, scale=2):
    """The photo (uint8 H x W x 3, as the model saw it) beside it with the heat map laid over it
    (matplotlib's jet colours, half transparent), the caption on a strip above both."""
    from matplotlib import colormaps

    photo = image.astype(np.float32)
    colours = colormaps["jet"](heat.numpy())[..., :3] * 255
    blended = (0.5 * photo + 0.5 * colours).clip(0, 255).astype(np.uint8)
    h, w = photo.shape[:2]
    strip = 24
    canvas = Image.new("RGB", (2 * w * scale, h * scale + strip), "white")
    canvas.paste(Image.fromarray(photo.astype(np.uint8)).resize((w * scale, h * scale)), (0, strip))
    canvas.paste(Image.fromarray(blended).resize((w * scale, h * scale)), (w * scale, strip))
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow before 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    ImageDraw.Draw(canvas).text((6, 3), caption, fill="black", font=font)
    return canvas


def write_cams(model, files, preprocessing, classes, probabilities, out_dir, class_name=None,
               layer="inception5b", batch_size=16):
    """One PNG per readable file in out_dir, named <image>_<class>_<probability>.png; returns the paths.
    model: eval mode, without aux heads, on its device."""
    import torch

    device = next(model.parameters()).device
    if class_name is not None and class_name not in classes:
        raise CamError(f"--cam-class {class_name} is not one of the model's classes: {', '.join(classes)}")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise CamError(f"cannot create {out_dir} ({e.strerror or e}): pass --cam with a writable folder") from e
    written = []
    for start in range(0, len(files), batch_size):
        chunk = [(i, f) for i, f in enumerate(files[start:start + batch_size], start)]
        raw = np.stack([imgs.resize_and_crop(imgs.load_image(f), preprocessing) for _, f in chunk])
        images = torch.from_numpy(imgs.normalize(raw, preprocessing)).to(device, memory_format=torch.channels_last)
        targets = [classes.index(class_name) if class_name else int(probabilities[i].argmax()) for i, _ in chunk]
        heat = grad_cam(model, images, torch.tensor(targets, device=device), layer).cpu()
        for (i, path), k, image, h in zip(chunk, targets, raw, heat):
            p = float(probabilities[i, k])
            name = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(path))[0]}_{classes[k]}_{p:.2f}.png")
            if name in written:  # the same file name in two folders
                name = os.path.join(out_dir, f"{i:05d}_{os.path.basename(name)}")
            picture = overlay(image, h, f"{classes[k]} {p:.2f} ({layer})")
            written.append(name)
            atomic_write(written[-1], lambda f, picture=picture: picture.save(f, format="PNG"))
    return written


# ---------------------------------------------------------------------------------------------
# feature maps and filters
# ---------------------------------------------------------------------------------------------
TILE, GAP = 96, 6  # pixels of a channel's tile in the grid, and between tiles


def _caption_font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _grid(tiles, captions, title, left=None):
    """uint8 tiles (H x W x 3, all one size) in a near-square grid, each captioned below, an
    optional picture on the left and a title on top; returns (picture, the tiles' boxes)."""
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tile, caption, top = tiles[0].shape[0], 18, 28
    x0 = GAP + (left.width + 2 * GAP if left is not None else 0)
    width = x0 + columns * (tile + GAP)
    height = max(top + rows * (tile + caption + GAP), top + (left.height + GAP if left is not None else 0))
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), _caption_font()
    draw.text((GAP, 6), title, fill="black", font=font)
    if left is not None:
        canvas.paste(left, (GAP, top))
    boxes = []
    for k, (pixels, text) in enumerate(zip(tiles, captions)):
        x, y = x0 + (k % columns) * (tile + GAP), top + (k // columns) * (tile + caption + GAP)
        canvas.paste(Image.fromarray(pixels), (x, y))
        draw.text((x, y + tile + 2), text, fill="black", font=font)
        boxes.append((x, y, x + tile, y + tile))
    return canvas, boxes


def feature_maps(model, photo, preprocessing, layer, channels=16):
    """The first `channels` output maps of `layer` (a spatial stage of model.STAGES) for a photo,
    each scaled to its own range (black: its lowest value, white: its highest), beside the photo
    as the network saw it. Returns (picture, boxes of the channel tiles)."""
    import torch

    from model import STAGES

    if layer not in STAGES or getattr(model, layer, None) is None:
        raise CamError(f"--layer {layer}: not a stage of this model; choose one of {', '.join(STAGES)}")
    pixels = imgs.resize_and_crop(imgs.load_image(photo), preprocessing)
    x = torch.from_numpy(imgs.normalize(pixels[None], preprocessing))
    captured = []
    hook = getattr(model, layer).register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.inference_mode():
            model.eval()(x.to(next(model.parameters()).device))
    finally:
        hook.remove()
    maps = captured[0]
    if maps.dim() != 4:
        raise CamError(f"--layer {layer} gives {tuple(maps.shape[1:])} per image, not maps: choose a stage "
                       "from conv1 to inception5b")
    maps = maps[0, :channels].float().cpu()
    low, high = maps.flatten(1).min(1).values, maps.flatten(1).max(1).values
    scaled = ((maps - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None] * 255).to(torch.uint8)
    tiles = [np.asarray(Image.fromarray(m.numpy()).resize((TILE, TILE), Image.NEAREST).convert("RGB"))
             for m in scaled]
    h, w = maps.shape[-2:]
    title = f"{layer}: channels 0-{len(tiles) - 1} of {captured[0].shape[1]}, {h} x {w} each"
    photo_tile = Image.fromarray(pixels).resize((2 * TILE, 2 * TILE))
    return _grid(tiles, [f"{k}" for k in range(len(tiles))], title, left=photo_tile)


def conv1_filters(model):
    """conv1's kernels (64 of 3 x 7 x 7) as colour tiles, each scaled to its own range around grey
    (0 -> 128), so a trained network's edges and colour blobs show as they are. (picture, boxes)."""
    import torch

    weights = model.conv1.conv.weight.detach().float().cpu()
    scale = weights.flatten(1).abs().max(1).values.clamp_min(1e-12)
    tiles = ((weights / scale[:, None, None, None]) * 127 + 128).clamp(0, 255).to(torch.uint8)
    tiles = [np.asarray(Image.fromarray(t.permute(1, 2, 0).numpy()).resize((TILE // 2, TILE // 2), Image.NEAREST))
             for t in tiles]
    return _grid(tiles, [f"{k}" for k in range(len(tiles))], f"conv1: {len(tiles)} kernels of 7 x 7 x 3")


def roughness(kernels):
    """How much neighbouring taps of each kernel differ, against how much its taps vary at all:
    about 1.4 for white noise (a random initialisation), much less for the smooth edges and blobs
    a trained first layer learns. kernels: N x C x H x W; returns the mean over the N kernels."""
    k = kernels.detach().float()
    k = k - k.mean(dim=(2, 3), keepdim=True)
    steps = ((k[..., 1:, :] - k[..., :-1, :]).pow(2).mean(dim=(1, 2, 3))
             + (k[..., 1:] - k[..., :-1]).pow(2).mean(dim=(1, 2, 3)))
    return float((steps / 2 / k.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-20)).sqrt().mean())


def save_picture(picture, path):
    atomic_write(path, lambda f: picture.save(f, format="PNG"), hint="pass --output with a writable path")
