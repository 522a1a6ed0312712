"""Running exported .onnx files: ONNX Runtime sessions fed with numpy arrays, without torch.

export.py writes the files (fp32, or INT8 with --int8) with the class names and the preprocessing
in their metadata; predict.py and app.py run them through OnnxModel, so a .onnx file is all they need.
"""
import json

from images import Preprocessing
from options import UserError

MISSING = ("running .onnx files needs onnxruntime, an optional dependency: pip install onnxruntime "
           "(export.py also needs onnx and onnxscript)")


class OnnxError(UserError):
    """A .onnx file that cannot be run: missing runtime, unreadable file, no metadata."""


class OnnxModel:
    """An exported .onnx file (a path or its bytes) in ONNX Runtime, called with a float32 array
    N x 3 x H x W of normalised images; returns the logits N x classes as a numpy array.
    ``metadata`` holds what export.py stored."""

    def __init__(self, source, threads=None):
        try:
            import onnxruntime
        except ImportError:
            raise OnnxError(MISSING)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise OnnxError(f"{source if isinstance(source, str) else 'the model'} is not a readable ONNX "
                            f"model ({str(e).splitlines()[0][:120]}): export it again with export.py")
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input_name: images})[0]


def load_onnx(path, threads=None):
    """(model, classes, Preprocessing) of a file written by export.py."""
    model = OnnxModel(path, threads)
    try:
        meta = model.metadata
        classes = json.loads(meta["classes"])
        preprocessing = Preprocessing(int(meta["val_resize"]), int(meta["val_crop"]),
                                      tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])))
    except (KeyError, ValueError):
        raise OnnxError(f"{path} has no class names and preprocessing in its metadata: export it with export.py")
    return model, classes, preprocessing
