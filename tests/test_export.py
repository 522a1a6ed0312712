"""export.py: the session's small run exported to ONNX (conftest.py's small_onnx), its metadata,
ONNX Runtime against PyTorch, INT8 (static QDQ, calibrated on training photos, refused when it loses
too much), and predict.py running .onnx files, without torch and with OpenVINO. Skipped with a reason
where onnx, onnxruntime or onnxscript are not installed. Which photos calibrate and the accuracy gate
in whole photos: test_int8_calibration.py."""
import json
import os
import shutil
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import export
import predict
from helpers import FP32, REPO, assert_clean_error, call, needs, run_script, write_corrupt, write_truncated_jpeg
from inference import checkpoint as ckpt
from inference import classify, images, runtimes

pytestmark = needs("onnx", "onnxruntime", "onnxscript", why="ONNX export needs them: requirements-dev.txt")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(small_run, small_onnx, tmp_path_factory):
    """The small run (torchvision variant, evaluated at 60 px from 64) and its fp32 export."""
    return {"root": tmp_path_factory.mktemp("export"), "data": small_run["data"], "best": small_run["best"],
            "onnx": small_onnx}


def test_the_graph_has_a_free_batch_size_and_no_aux_heads(exported):
    import onnx

    model = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == export.OPSET
    (images,), (logits,) = model.graph.input, model.graph.output
    assert images.name == "images" and logits.name == "logits"
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic: any batch size
    assert [d.dim_value for d in dims[1:]] == [3, 60, 60]
    assert logits.type.tensor_type.shape.dim[1].dim_value == 3
    assert not any("aux" in node.name for node in model.graph.node)
    assert not any("aux" in init.name for init in model.graph.initializer)


def metadata(path):
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_metadata_holds_the_class_names_and_preprocessing(exported):
    meta = metadata(exported["onnx"])
    assert json.loads(meta["classes"]) == ["daisy", "roses", "tulips"]
    assert (meta["val_resize"], meta["val_crop"], meta["variant"]) == ("64", "60", "torchvision")
    assert json.loads(meta["mean"]) == list(images.MEAN) and json.loads(meta["std"]) == list(images.STD)
    model, classes, preprocessing = runtimes.load_onnx(str(exported["onnx"]))
    assert classes == ["daisy", "roses", "tulips"]
    assert preprocessing == images.Preprocessing(64, 60, images.MEAN, images.STD)
    _, _, recorded = ckpt.load_model(str(exported["best"]), "unused.json", CPU)
    assert preprocessing == recorded


def test_onnx_runtime_gives_pytorchs_probabilities_on_images(exported):
    torch_model = classify.load_classifier(str(exported["best"]), device="cpu", amp="off")
    onnx_model = classify.load_classifier(str(exported["onnx"]))
    assert onnx_model.torch_model is None and onnx_model.preprocessing == torch_model.preprocessing
    files = sorted(str(p) for p in (exported["data"] / "val").rglob("*.jpg"))
    expected, _ = classify.predict(torch_model, files, 4, 0)
    got, errors = classify.predict(onnx_model, files, 4, 0)
    assert errors == [""] * len(files) and got.shape == (6, 3)
    assert abs(got - expected).max() <= export.TOLERANCE


def test_predict_with_the_onnx_file_prints_what_the_pth_does(exported, tmp_path):
    image = exported["data"] / "val" / "roses" / "roses_01.jpg"
    outputs = {}
    for name in ("best", "onnx"):
        code, out, err = call(predict, [*FP32, image, "--weights", exported[name], "--topk", 2])
        assert code == 0, err
        outputs[name] = [(line.split()[0], float(line.split()[1])) for line in out.splitlines()]
    assert [c for c, _ in outputs["onnx"]] == [c for c, _ in outputs["best"]] and len(outputs["onnx"]) == 2
    for (_, p), (_, q) in zip(outputs["onnx"], outputs["best"]):
        assert p == pytest.approx(q, abs=2e-4)
    for ext in ("csv", "json"):
        for name in ("best", "onnx"):
            path = tmp_path / f"{name}.{ext}"
            code, _, err = call(predict, [*FP32, exported["data"] / "val", "--weights", exported[name],
                                          "--output", path])
            assert code == 0, err
        if ext == "json":
            a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("best", "onnx"))
            assert [r["class"] for r in a] == [r["class"] for r in b]
        else:
            a, b = ((tmp_path / f"{n}.csv").read_text().splitlines() for n in ("best", "onnx"))
            assert [r.split(",")[:2] for r in a] == [r.split(",")[:2] for r in b]


def test_export_refuses_a_result_that_does_not_match(exported, tmp_path, monkeypatch):
    """export.py's own check of ONNX Runtime against PyTorch: torch.onnx.export gives the graph the
    session already exported (its conversion is PyTorch's, and a dozen seconds), ONNX Runtime's
    answers are made 1.5 times too large, and the file must not be written."""
    import onnx

    graph = onnx.load(str(exported["onnx"]))
    graph.ClearField("metadata_props")  # export.py adds its own
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: SimpleNamespace(model_proto=graph))
    real_call = export.OnnxModel.__call__
    monkeypatch.setattr(export.OnnxModel, "__call__", lambda self, x: real_call(self, x) * 1.5)
    out = tmp_path / "bad.onnx"
    code, _, err = call(export, ["--weights", exported["best"], "--output", out])
    assert_clean_error(code, err, "differ from PyTorch's", "was not written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_errors_are_one_line(exported, tmp_path):
    code, _, err = call(export, ["--weights", tmp_path / "missing.pth", "--output", tmp_path / "x.onnx"])
    assert_clean_error(code, err, "does not exist")
    code, _, err = call(export, ["--weights", exported["best"], "--output", tmp_path / "x.pth"])
    assert_clean_error(code, err, "must end in .onnx")
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"not a model")
    code, _, err = call(predict, [*FP32, exported["data"] / "val", "--weights", not_onnx])
    assert_clean_error(code, err, "not a readable ONNX model")
    code, _, err = call(predict, [*FP32, exported["data"] / "val", "--weights", tmp_path / "none.onnx"])
    assert_clean_error(code, err, "does not exist", "export.py")
    code, _, err = call(predict, [exported["data"] / "val", "--weights", exported["onnx"], "--amp", "bf16"])
    assert_clean_error(code, err, "--amp bf16", "a .onnx file runs as it was exported")


def test_missing_onnx_packages_give_one_line(exported, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    code, _, err = call(export, ["--weights", exported["best"], "--output", tmp_path / "y.onnx"])
    assert_clean_error(code, err, "pip install onnx onnxscript onnxruntime")
    code, _, err = call(predict, [*FP32, exported["data"] / "val", "--weights", exported["onnx"]])
    assert_clean_error(code, err, "pip install onnxruntime")


# ---------------------------------------------------------------------------------------------
# INT8, and .onnx prediction without torch
# ---------------------------------------------------------------------------------------------
def with_the_fp32_export(monkeypatch, exported):
    """export.to_onnx gives the session's fp32 file at once: the tests of INT8 are about what comes after."""
    blob = exported["onnx"].read_bytes()
    monkeypatch.setattr(export, "to_onnx", lambda *args, **kwargs: (blob, 0.0))
    return blob


@pytest.fixture(scope="module")
def int8(exported):
    out = exported["root"] / "int8.onnx"
    with pytest.MonkeyPatch.context() as m:
        with_the_fp32_export(m, exported)
        code, stdout, err = call(export, ["--weights", exported["best"], "--int8", "--calibration-images", 6,
                                          "--max-accuracy-drop", 100, "--output", out])
    assert code == 0, err
    return {"path": out, "stdout": stdout}


def test_int8_is_static_qdq_with_per_channel_weights_and_says_how_it_was_made(exported, int8):
    import onnx

    model = onnx.load(str(int8["path"]))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ around the fp32 operators
    initializers = {t.name: t for t in model.graph.initializer}
    weights = [initializers[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in initializers and initializers[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weights and all(len(initializers[n.input[1]].dims) == 1 for n in model.graph.node
                           if n.op_type == "DequantizeLinear" and n.input[0] in {w.name for w in weights})
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["quantization"].startswith("int8: ONNX Runtime static post-training quantization, QDQ, per-channel")
    assert meta["calibration"] == f"6 training photos of {exported['data']}"
    assert json.loads(meta["classes"]) == ["daisy", "roses", "tulips"] and meta["val_crop"] == "60"
    line = next(text for text in int8["stdout"].splitlines() if text.startswith("val accuracy on 6 photos"))
    assert f"fp32 {float(meta['fp32_val_accuracy']):.4f}, INT8 {float(meta['int8_val_accuracy']):.4f}" in line
    change = 100 * (float(meta["int8_val_accuracy"]) - float(meta["fp32_val_accuracy"]))
    assert f"({change:+.1f} points)" in line  # the sign of the change: "+0.0" when nothing changed, never "-0.0"
    assert os.path.getsize(int8["path"]) < 0.5 * os.path.getsize(exported["onnx"])  # int8 weights


@pytest.fixture
def fp32_exported(exported, monkeypatch):
    return with_the_fp32_export(monkeypatch, exported)


def test_int8_calibrates_on_training_photos_only(exported, fp32_exported, monkeypatch):
    seen = []
    real = export.QuantizationReader.get_next

    def spy(self):
        batch = real(self)
        if batch is not None:
            seen.extend(self.files[self.position - len(batch["images"]):self.position])
        return batch

    monkeypatch.setattr(export.QuantizationReader, "get_next", spy)
    code, _, err = call(export, ["--weights", exported["best"], "--int8", "--calibration-images", 8,
                                 "--max-accuracy-drop", 100, "--output", exported["root"] / "spy.onnx"])
    assert code == 0, err
    assert len(seen) == 8 and all("/train/" in f for f in seen)
    # evenly over the classes: every 12 // 8-th photo, sorted by class, left the tulips out
    assert Counter(os.path.basename(os.path.dirname(f)) for f in seen) == {"daisy": 3, "roses": 3, "tulips": 2}


def test_more_calibration_photos_than_the_run_has_is_one_error_at_start(exported, tmp_path):
    out = tmp_path / "int8.onnx"
    code, stdout, err = call(export, ["--weights", exported["best"], "--int8", "--calibration-images", 13,
                                      "--output", out])
    assert_clean_error(code, err, "--calibration-images 13: the run has only 12 training photos")
    assert "ONNX Runtime against PyTorch" not in stdout and not out.exists()  # before any export


def test_int8_skips_the_photos_it_cannot_decode_and_says_which(exported, fp32_exported, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    truncated = write_truncated_jpeg(data / "train" / "tulips" / "tulips_99.jpg")  # training skips it too
    for photo in sorted((data / "val").rglob("*.jpg"))[:2]:
        write_corrupt(photo)
    out = tmp_path / "int8.onnx"
    code, stdout, err = call(export, ["--weights", exported["best"], "--int8", "--data-path", data,
                                      "--calibration-images", 13, "--max-accuracy-drop", 100, "--output", out])
    assert code == 0 and "Traceback" not in err, err
    (line,) = [text for text in stdout.splitlines() if "unreadable calibration" in text]
    assert line.startswith(f"INT8: skipped 1 unreadable calibration photo(s): {truncated} (OSError: image file is "
                           "truncated"), line
    assert "INT8: left out 2 unreadable val photo(s)" in stdout
    assert "val accuracy on 4 photos: fp32 " in stdout  # counted on the photos that could be read
    meta = metadata(out)
    assert meta["calibration"] == f"12 training photos of {data}" and meta["val_images"] == "4"


def test_int8_is_refused_when_no_val_photo_can_be_read(exported, fp32_exported, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(exported["data"], data)
    for photo in (data / "val").rglob("*.jpg"):
        write_corrupt(photo)
    out = tmp_path / "int8.onnx"
    code, _, err = call(export, ["--weights", exported["best"], "--int8", "--data-path", data,
                                 "--calibration-images", 4, "--output", out])
    assert_clean_error(code, err, "none of the 6 val photos could be read", "accuracy cannot be checked",
                       "was not written")
    assert not out.exists()


def test_predict_runs_the_int8_file_and_mostly_agrees_with_fp32(exported, int8):
    fp32 = classify.load_classifier(str(exported["onnx"]))
    quantized = classify.load_classifier(str(int8["path"]))
    files = sorted(str(p) for p in (exported["data"] / "val").rglob("*.jpg"))
    a, _ = classify.predict(fp32, files, 4, 0)
    b, _ = classify.predict(quantized, files, 4, 0)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.5 and abs(a - b).max() < 0.5


def true_classes(files):
    """The class index of each val photo of a make_tree tree, from its folder's name."""
    return np.array([["daisy", "roses", "tulips"].index(os.path.basename(os.path.dirname(f))) for f in files])


def test_int8_that_loses_too_much_accuracy_is_refused(exported, fp32_exported, tmp_path, monkeypatch):
    calls = []

    def worse_int8(blob, classes, preprocessing, files):
        calls.append(1)  # fp32 right on every photo, then INT8 wrong on every one
        truth = true_classes(files)
        return (truth if len(calls) == 1 else (truth + 1) % 3), [""] * len(files)

    monkeypatch.setattr(export, "top_classes", worse_int8)
    out = tmp_path / "bad.onnx"
    code, stdout, err = call(export, ["--weights", exported["best"], "--int8", "--calibration-images", 4,
                                      "--output", out])
    assert_clean_error(code, err, "INT8 loses 100.0 points", "--max-accuracy-drop 1", "was not written")
    assert not out.exists()


def test_int8_without_the_runs_data_says_where_to_point(exported, tmp_path):
    moved = dict(ckpt.load_checkpoint(str(exported["best"])))
    moved["args"] = dict(moved["args"], data_path=str(tmp_path / "gone"))
    torch.save(moved, tmp_path / "moved.pth")
    code, _, err = call(export, ["--weights", tmp_path / "moved.pth", "--int8", "--output", tmp_path / "x.onnx"])
    assert_clean_error(code, err, str(tmp_path / "gone"), "--data-path")


def test_predict_with_an_onnx_file_never_imports_torch(exported):
    image = sorted((exported["data"] / "val").rglob("*.jpg"))[0]
    program = ("import runpy, sys\n"
               f"sys.argv = ['predict.py', {str(image)!r}, '--weights', {str(exported['onnx'])!r}]\n"
               "try:\n    runpy.run_path('predict.py', run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code\n"
               "print('exit', code, 'torch' in sys.modules, 'torchvision' in sys.modules)\n")
    proc = run_script(["-c", program])
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 False False", proc.stdout + proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.split()[0] in ("daisy", "roses", "tulips")]) == 3


def test_openvino_runs_both_files_as_onnx_runtime_does(exported, int8, tmp_path):
    pytest.importorskip("openvino", reason="--runtime openvino needs openvino (requirements-dev.txt)")
    # OpenVINO runs in child processes only: its own threading libraries, loaded beside torch's in
    # this long test process, are not something the suite should depend on
    # --amp off keeps OpenVINO in f32; auto lets it compute in bf16 where the CPU has native bf16, so
    # it gets a bf16 tolerance (8 bits of mantissa through 60 layers: a few hundredths at most)
    folder = exported["data"] / "val"  # 6 photos: batches of 4 and a last one of 2
    for path, amp, tolerance in ((exported["onnx"], "off", 1e-4), (exported["onnx"], "auto", 0.05),
                                 (int8["path"], "off", 0.1)):
        results = {}
        for runtime in ("onnxruntime", "openvino"):
            out = tmp_path / f"{runtime}.json"
            proc = run_script(REPO / "predict.py", [folder, "--weights", path, "--runtime", runtime, "--amp", amp,
                                                    "--batch-size", 4, "--output", out])
            assert proc.returncode == 0, proc.stderr
            results[runtime] = {r["file"]: r["probabilities"] for r in json.loads(out.read_text())}
        assert results["openvino"].keys() == results["onnxruntime"].keys() and len(results["openvino"]) == 6
        worst = max(abs(results["openvino"][f][c] - p)
                    for f, row in results["onnxruntime"].items() for c, p in row.items())
        assert worst <= tolerance, (path, amp, worst)


def test_runtime_mistakes_are_one_line(exported, monkeypatch):
    image = sorted((exported["data"] / "val").rglob("*.jpg"))[0]
    code, _, err = call(predict, [*FP32, image, "--weights", exported["best"], "--runtime", "openvino"])
    assert_clean_error(code, err, "--runtime openvino runs .onnx files", "export.py")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    code, _, err = call(predict, [image, "--weights", exported["onnx"], "--runtime", "openvino"])
    assert_clean_error(code, err, "pip install openvino")
