"""Which ONNX Runtime execution providers run a .onnx file: CUDA's (onnxruntime-gpu) where --device
asks for it or --device auto finds it, the CPU's behind it. This machine's onnxruntime has no CUDA
provider: where it is faked as present, the real InferenceSession is still called, and runs on the CPU
as onnxruntime does when a listed provider cannot start."""
import pytest

import predict
from helpers import assert_clean_error, call, class_lines, needs
from inference import runtimes
from plumbing.options import UserError

CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", *CPU_ONLY]


@pytest.mark.quick
@pytest.mark.parametrize("device, available, expected", [
    ("auto", CPU_ONLY, ["CPUExecutionProvider"]),
    ("auto", WITH_CUDA, [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    ("cpu", WITH_CUDA, ["CPUExecutionProvider"]),
    ("cuda", WITH_CUDA, [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    ("cuda:1", WITH_CUDA, [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
])
def test_the_cuda_provider_comes_first_where_asked_for_and_installed(device, available, expected):
    assert runtimes.onnx_providers(device, available) == expected


@pytest.mark.quick
@pytest.mark.parametrize("device, available, fragment", [
    ("cuda", CPU_ONLY, "pip install onnxruntime-gpu"),
    ("mps", WITH_CUDA, "cpu or cuda"),
    ("cuda:x", WITH_CUDA, "cuda:N"),
])
def test_a_device_the_runtime_cannot_serve_is_one_line(device, available, fragment):
    with pytest.raises(UserError, match=fragment):
        runtimes.onnx_providers(device, available)


@needs("onnx", "onnxruntime", "onnxscript", why="ONNX export needs them: requirements-dev.txt")
def test_predict_asks_for_the_cuda_provider_where_onnxruntime_has_it(small_run, small_onnx, monkeypatch):
    import onnxruntime

    image = small_run["data"] / "val" / "roses" / "roses_01.jpg"
    code, out, err = call(predict, [image, "--weights", small_onnx, "--device", "cuda"])
    assert_clean_error(code, err, "--device cuda", "onnxruntime-gpu")
    code, cpu_out, err = call(predict, [image, "--weights", small_onnx])
    assert code == 0, err

    requested, real_session = [], onnxruntime.InferenceSession

    def recording_session(source, options=None, providers=None, **kwargs):
        requested.append(providers)
        return real_session(source, options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: WITH_CUDA)
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    code, out, err = call(predict, [image, "--weights", small_onnx])
    assert code == 0, err
    assert requested == [[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]]
    assert class_lines(out) == class_lines(cpu_out) != []
