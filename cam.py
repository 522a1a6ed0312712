"""Grad-CAM heat maps: where in a photo the evidence for a class lies (Selvaraju et al., 2017).

    python predict.py tulip.jpg --cam cams/                           # the predicted class
    python predict.py tulip.jpg --cam cams/ --cam-class roses --cam-layer inception4e

The method is captum's LayerGradCam (PyTorch's interpretability library, an optional dependency):
the gradients of the class score, averaged over each channel of a layer's output, weight that
output's channels, and the positive part of the sum is the heat map, upsampled to the image.
torch is imported by the functions that use it: predict.py reads LAYERS for its --help, and a
.onnx prediction never imports torch.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import images as imgs
from atomic import atomic_write
from options import UserError

# the layers whose outputs are spatial maps; the last Inception block is the default, as in the paper's
# CAM; earlier blocks give finer maps from smaller receptive fields
LAYERS = ("conv1", "conv2", "conv3", "inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
          "inception4d", "inception4e", "inception5a", "inception5b")
MISSING = "Grad-CAM needs captum, an optional dependency: pip install captum"


class CamError(UserError):
    """A heat map that cannot be drawn: the message says what to do."""


def grad_cam(model, images, targets, layer="inception5b"):
    """Heat maps N x H x W in [0, 1] (each scaled by its own maximum) for the classes in targets.

    images: normalised N x 3 x H x W; model: eval mode, without aux heads.
    """
    import torch

    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise CamError(MISSING)
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
        raise CamError(f"cannot create {out_dir} ({e.strerror or e}): pass --cam with a writable folder")
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
            atomic_write(written[-1], lambda f: picture.save(f, format="PNG"))
    return written
