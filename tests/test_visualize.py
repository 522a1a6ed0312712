"""inference/visualize.py: what the network looks at and what its layers see. Grad-CAM (predict.py
--cam) points at what decides the class: the proof trains the real model briefly on generated photos
whose class is only the quadrant a red square sits in, on a background of random coloured tiles,
then asks where the heat map peaks. Feature maps and conv1's filters (report.py) draw what they say.
"""

import numpy as np
import pytest
import torch

import predict
import train
from helpers import FP32, assert_clean_error, call, load, needs, train_argv
from inference import images, visualize
from model import GoogLeNet
from training import data

needs_captum = needs("captum", why="Grad-CAM needs it: requirements-dev.txt")

SIZE, SQUARE = 96, 19
CPU = torch.device("cpu")


def quadrant_photos(n, rng):
    """n normalised photos SIZE x SIZE and their classes: the quadrant (0 top left, 1 top right,
    2 bottom left, 3 bottom right) holding a red square, placed at random inside it."""
    tiles = rng.integers(0, 256, (n, SIZE // 8, SIZE // 8, 3))
    tiles[..., 0] = np.minimum(tiles[..., 0], 150)  # no red tile looks like the square
    photos = np.kron(tiles, np.ones((1, 8, 8, 1))).astype(np.float32)
    classes = rng.integers(0, 4, n)
    for photo, q in zip(photos, classes):
        top, left = (q // 2) * SIZE // 2, (q % 2) * SIZE // 2
        r, c = top + rng.integers(0, SIZE // 2 - SQUARE), left + rng.integers(0, SIZE // 2 - SQUARE)
        photo[r:r + SQUARE, c:c + SQUARE] = (250, 20, 20)
    return torch.from_numpy(photos).permute(0, 3, 1, 2).contiguous() / 127.5 - 1, torch.from_numpy(classes)


@pytest.fixture(scope="module")
def quadrant_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = GoogLeNet(num_classes=4, init_weights=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    for _ in range(60):  # about 25 s on two cores
        x, y = quadrant_photos(16, rng)
        logits, aux2, aux1 = model(x)
        loss = sum(w * torch.nn.functional.cross_entropy(o, y) for w, o in zip((1, 0.3, 0.3), (logits, aux1, aux2)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.aux_logits = False
    return model.eval(), rng


@needs_captum
def test_the_heat_map_peaks_in_the_squares_quadrant(quadrant_model):
    """At inception3b (12 x 12 at 96 px), whose receptive fields are local. The last blocks see the
    whole image from every position, and on this task they put the evidence for "top left" in the
    empty space that tells the square is not elsewhere (measured with this model: peaks in the
    square's quadrant for 0% of the images at inception5b, 50% at 4e, 81% at 4a, 100% at 3b), which
    is why --cam-layer exists."""
    model, rng = quadrant_model
    x, y = quadrant_photos(32, rng)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.8  # it learned the task
    heat = visualize.grad_cam(model, x, y, layer="inception3b")
    assert heat.shape == (32, SIZE, SIZE) and heat.min() >= 0 and heat.flatten(1).amax(1).allclose(torch.ones(32))
    peaks = heat.flatten(1).argmax(1)
    rows, cols = peaks // SIZE, peaks % SIZE
    found = (rows >= SIZE // 2).long() * 2 + (cols >= SIZE // 2).long()
    assert (found == y).float().mean() >= 0.75, (found, y)


@needs_captum
def test_another_class_points_elsewhere(quadrant_model):
    """The heat map of a class the photo is not (the square's diagonal opposite) does not peak on the square."""
    model, rng = quadrant_model
    x, y = quadrant_photos(32, rng)
    heat = visualize.grad_cam(model, x, 3 - y, layer="inception3b")
    peaks = heat.flatten(1).argmax(1)
    found = (peaks // SIZE >= SIZE // 2).long() * 2 + (peaks % SIZE >= SIZE // 2).long()
    assert (found == y).float().mean() <= 0.5


@needs_captum
def test_predict_cam_writes_one_picture_per_image_named_by_class_and_probability(small_run, tmp_path):
    from PIL import Image

    images = sorted((small_run["data"] / "val").rglob("*.jpg"))
    code, out, err = call(predict, [*FP32, small_run["data"] / "val", "--weights", small_run["best"], "--cam",
                                    tmp_path / "cams", "--output", tmp_path / "p.csv"])
    assert code == 0, err
    assert "6 Grad-CAM heat map(s) (inception5b) written to" in out
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    expected = sorted(f"{image.stem}_{row[1]}_{float(row[2]):.2f}.png" for image, row in zip(images, rows))
    assert written == expected
    crop = load(small_run["best"])["val_crop"]  # 60: 1.25 x the 48 px training size
    with Image.open(tmp_path / "cams" / written[0]) as picture:
        assert picture.size == (2 * 2 * crop, 2 * crop + 24)  # photo and overlay, twice the crop, caption


@needs_captum
def test_cam_class_and_layer(small_run, tmp_path):
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, out, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--cam", tmp_path, "--cam-class",
                                    "tulips", "--cam-layer", "inception4e"])
    assert code == 0, err
    (picture,) = tmp_path.glob("daisy_00_tulips_*.png")
    assert "(inception4e)" in out


@needs_captum
def test_cam_errors_are_one_line(small_run, tmp_path, monkeypatch):
    image = small_run["data"] / "val" / "daisy" / "daisy_00.jpg"
    code, _, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--cam", tmp_path, "--cam-class",
                                  "lilies"])
    assert_clean_error(code, err, "--cam-class lilies", "daisy, roses, tulips")
    code, _, err = call(predict, [*FP32, image, "--weights", tmp_path / "m.onnx", "--cam", tmp_path])
    assert_clean_error(code, err, "--cam needs", ".pth")
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("captum") else real_import(name, *a, **k))
    code, _, err = call(predict, [*FP32, image, "--weights", small_run["best"], "--cam", tmp_path])
    assert_clean_error(code, err, "pip install captum")


# ---------------------------------------------------------------------------------------------
# what the layers see: feature maps and conv1's filters
# ---------------------------------------------------------------------------------------------
def test_feature_maps_draw_the_asked_channels_of_the_layer_beside_the_photo(small_run, tmp_path, capsys):
    from PIL import Image

    import report
    from inference import checkpoint

    trained, _, preprocessing = checkpoint.load_model(str(small_run["best"]), "unused.json", torch.device("cpu"))
    photo = sorted((small_run["data"] / "val").rglob("*.jpg"))[0]
    picture, boxes = visualize.feature_maps(trained, str(photo), preprocessing, "inception3a", channels=12)
    assert len(boxes) == 12
    tiles = [np.asarray(picture.crop(box))[..., 0] for box in boxes]
    outputs = []
    hook = trained.inception3a.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
    x = data.normalize_batch(data.EvalTransform(preprocessing)(images.load_image(str(photo)))[None])
    with torch.inference_mode():
        trained(x)
    hook.remove()
    assert outputs[0].shape[0] == 256 and len({t.tobytes() for t in tiles}) > 1
    for k, tile in enumerate(tiles):  # channel k, each scaled to its own range and blown up
        m = outputs[0][k]
        scaled = ((m - m.min()) / (m.max() - m.min()).clamp_min(1e-12) * 255).to(torch.uint8).numpy()
        assert np.array_equal(tile, np.asarray(Image.fromarray(scaled).resize(tile.shape[::-1], Image.NEAREST))), k
    capsys.readouterr()
    code = report.run(["--weights", str(small_run["best"]), "--feature-maps", str(photo), "--layer", "conv1",
                       "--channels", "5", "--output", str(tmp_path / "maps.png")])
    assert code == 0 and capsys.readouterr().out.strip() == f"wrote {tmp_path / 'maps.png'}: 5 tiles"
    with Image.open(tmp_path / "maps.png") as written:
        assert written.format == "PNG" and written.width > 3 * visualize.TILE


def test_feature_map_mistakes_are_one_line(small_run, tmp_path, capsys):
    import report

    photo = sorted((small_run["data"] / "val").rglob("*.jpg"))[0]
    for argv, words in (([str(photo), "--layer", "fc"], "not maps"),
                        ([str(photo), "--layer", "inception9z"], "not a stage"),
                        ([str(tmp_path / "none.jpg")], "does not exist")):
        code = report.run(["--weights", str(small_run["best"]), "--feature-maps", *argv,
                           "--output", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and words in err, err
    assert report.run(["--filters"]) == 2 and "--weights" in capsys.readouterr().err


def test_roughness_tells_smooth_kernels_from_noise():
    torch.manual_seed(0)
    noise = torch.randn(64, 3, 7, 7)
    y, x = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    blobs = torch.stack([torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 8) for cx in range(4) for cy in range(4)])
    edges = torch.stack([torch.tanh(x - c) for c in (2.0, 3.0, 4.0)] + [torch.tanh(y - c) for c in (2.0, 3.0, 4.0)])
    smooth = torch.cat([blobs, edges])[:, None].expand(-1, 3, -1, -1)
    assert 1.3 < visualize.roughness(noise) < 1.5  # sqrt(2) for white noise
    assert visualize.roughness(smooth) < 0.5


def test_trained_conv1_filters_are_smoother_than_their_random_start(tmp_path):
    """Trained on photos whose colours change smoothly, the real network's first layer moves away
    from the white noise it starts as (measured: roughness 1.43 at the start, about 1.2 after 24
    steps); the picture shows its 64 kernels as colour tiles."""
    from PIL import Image

    import model as model_py
    from inference import checkpoint

    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 1)):
        for k, name in enumerate(("a", "b", "c")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(count):  # a coarse random field blown up smoothly: colour changes slowly everywhere
                field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                field[..., k] = 255
                smooth = Image.fromarray(field).resize((64, 64), Image.BICUBIC)
                smooth.save(tmp_path / "data" / split / name / f"{i}.png")
    out = tmp_path / "out"
    argv = train_argv(tmp_path / "data", out, "--image-size", 64, "--lr", "1e-2", "--warmup-epochs", 0,
                      "--no-model-ema", epochs=4, batch_size=16)
    assert call(train, argv)[0] == 0
    torch.manual_seed(0)  # train.py's --seed 0 draws the same initial weights
    start = model_py.GoogLeNet(num_classes=3, variant="torchvision", init_weights=True)
    trained = checkpoint.load_checkpoint(str(out / "last.pth"))["model"]["conv1.conv.weight"]
    before, after = visualize.roughness(start.conv1.conv.weight), visualize.roughness(trained)
    assert before > 1.35 and after < 0.9 * before, (before, after)
    picture, boxes = visualize.conv1_filters(checkpoint.load_model(str(out / "last.pth"), "x", torch.device("cpu"))[0])
    assert len(boxes) == 64
