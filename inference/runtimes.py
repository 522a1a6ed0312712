"""Running exported .onnx files without torch: in ONNX Runtime (OnnxModel) or OpenVINO
(OpenVinoModel), fed with numpy arrays.

export.py writes the files (fp32, or INT8 with --int8) with the class names, the preprocessing,
the temperature and the "not sure" threshold in their metadata; predict.py and app.py run them
through load_onnx and recorded_calibration, so a .onnx file is all they need. OpenVINO reads the
same file (INT8 QDQ included) and runs the INT8 file faster than ONNX Runtime: 1.4x on an
AVX2-only CPU, 4.2x on one with VNNI and AMX (docs/performance.md). Like PyTorch's --amp auto,
OpenVINO computes in bf16 on CPUs with native bf16 unless told f32 (amp="off"); ONNX Runtime always
computes an fp32 file in fp32.
"""
import json

from inference import calibration
from inference.images import Preprocessing
from plumbing.options import UserError

RUNTIMES = ("onnxruntime", "openvino")
MISSING = ("running .onnx files needs onnxruntime, an optional dependency: pip install onnxruntime "
           "(export.py also needs onnx and onnxscript)")
OPENVINO_MISSING = "--runtime openvino needs OpenVINO, an optional dependency: pip install openvino"
CUDA_PROVIDER = "CUDAExecutionProvider"  # onnxruntime-gpu's


def onnx_providers(device, available):
    """ONNX Runtime's execution providers for --device (auto, cpu, cuda or cuda:N), given the ones
    this onnxruntime has: CUDA's first where asked for (auto: where onnxruntime-gpu has it), then the
    CPU's, which runs whatever CUDA's cannot."""
    if device == "cpu" or (device == "auto" and CUDA_PROVIDER not in available):
        return ["CPUExecutionProvider"]
    if device != "auto" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: a .onnx file runs on cpu or cuda (through onnxruntime-gpu)")
    if CUDA_PROVIDER not in available:
        raise UserError(f"--device {device}: this onnxruntime has no CUDA provider; pip install onnxruntime-gpu "
                        "(in place of onnxruntime), or use --device cpu")
    index = device.partition(":")[2] or "0"
    if not index.isdigit():
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return [(CUDA_PROVIDER, {"device_id": int(index)}), "CPUExecutionProvider"]


class OnnxModel:
    """An exported .onnx file (a path or its bytes) in ONNX Runtime, called with a float32 array
    N x 3 x H x W of normalised images; returns the logits N x classes as a numpy array.
    ``metadata`` holds what export.py stored. device: as --device (onnx_providers)."""

    def __init__(self, source, threads=None, device="cpu"):
        try:
            import onnxruntime
        except ImportError:
            raise UserError(MISSING) from None
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = onnx_providers(device, onnxruntime.get_available_providers())
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=providers)
        except Exception as e:
            raise UserError(f"{source if isinstance(source, str) else 'the model'} is not a readable ONNX "
                            f"model ({str(e).splitlines()[0][:120]}): export it again with export.py") from e
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.input_name = self.session.get_inputs()[0].name
        self.has_rotation = len(self.session.get_outputs()) > 1  # export.py's "rotation" output

    def __call__(self, images):
        return self.session.run(None, {self.input_name: images})[0]

    def with_rotation(self, images):
        """(logits, rotation agreement N) of a file exported with the rotation score."""
        logits, rotation = self.session.run(None, {self.input_name: images})[:2]
        return logits, rotation


class OpenVinoModel:
    """The same file compiled by OpenVINO for the CPU, called like OnnxModel. amp "auto" leaves the
    precision to OpenVINO (bf16 where the CPU has native bf16), "off" asks for f32."""

    def __init__(self, path, threads=None, amp="auto"):
        try:
            import openvino
        except ImportError:
            raise UserError(OPENVINO_MISSING) from None
        core = openvino.Core()
        try:
            network = core.read_model(path)
            config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
            if amp == "off":
                config["INFERENCE_PRECISION_HINT"] = "f32"
            self.compiled = core.compile_model(network, "CPU", config)
        except Exception as e:
            raise UserError(f"{path} is not a model OpenVINO can read ({str(e).splitlines()[0][:120]}): "
                            "export it again with export.py, or use --runtime onnxruntime") from e
        # OpenVINO keeps an ONNX file's metadata_props under rt_info["framework"]
        framework = network.get_rt_info()["framework"] if network.has_rt_info(["framework"]) else {}
        self.metadata = {key: value.astype(str) for key, value in framework.items()}
        self.output = self.compiled.output(0)
        self.has_rotation = len(self.compiled.outputs) > 1  # export.py's "rotation" output

    def __call__(self, images):
        return self.compiled(images)[self.output]

    def with_rotation(self, images):
        """(logits, rotation agreement N) of a file exported with the rotation score."""
        results = self.compiled(images)
        return results[self.output], results[self.compiled.output(1)]


def load_onnx(path, threads=None, runtime="onnxruntime", amp="auto", device="cpu"):
    """(model, classes, Preprocessing) of a file written by export.py, in the runtime named (amp: as
    OpenVinoModel takes it; device: as OnnxModel takes it, OpenVINO runs on the CPU)."""
    model = OpenVinoModel(path, threads, amp) if runtime == "openvino" else OnnxModel(path, threads, device)
    try:
        meta = model.metadata
        classes = json.loads(meta["classes"])
        preprocessing = Preprocessing(int(meta["val_resize"]), int(meta["val_crop"]),
                                      tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])))
    except (KeyError, ValueError):
        raise UserError(
            f"{path} has no class names and preprocessing in its metadata: export it with export.py") from None
    return model, classes, preprocessing


def recorded_calibration(model, path):
    """The temperature, "not sure" score and threshold in a loaded .onnx file's metadata
    (calibration.Calibration; a file exported before they existed: T = 1, no threshold)."""
    found = calibration.of_metadata(model.metadata)
    if found is None:
        raise UserError(f"{path} has a temperature or min_confidence in its metadata that is no number, or a "
                        "not_sure_score this version does not know: export it again with export.py")
    return found
