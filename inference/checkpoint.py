"""The one checkpoint format: writing it, reading it back, and loading weights into the model.

A checkpoint is a dict with the weights under "model" and what predict.py needs to use them
("classes", "variant", "image_size", "val_resize", "val_crop", "mean", "std"), the run's "split"
and "args"; last.pth adds the state to continue ("optimizer", "scheduler", "scaler", "model_ema",
the Progress fields and every process's "rng"). best.pth gets, once training ends, the "temperature"
that calibrates its probabilities, the "not_sure_score" and the "min_confidence" below which that
score answers a photo "unknown", and the "calibration" figures of that fit (inference/calibration.py;
none: T = 1, no threshold, the top probability). A run with --rotation-weight adds "rotation.*" keys.
A plain state dict (the classic ``googleNet.pth``) loads too; its classes then come from
class_indices.json.
"""
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from inference.images import MEAN, STD, Preprocessing
from model import AUX_PREFIXES, HEAD_PREFIXES, ROTATION_PREFIX, GoogLeNet
from plumbing.atomic import DISK_HINT, atomic_write, atomic_write_text
from plumbing.options import UserError


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """What every checkpoint of a run says besides the weights: the classes, the network's layout,
    the training crop and the evaluation preprocessing, the val split, the run's arguments and the
    review.csv decisions it applied."""

    classes: list
    variant: str
    image_size: tuple  # the training crop's (first, last) sizes: equal without progressive resizing
    preprocessing: Preprocessing
    split: Optional[dict]
    args: dict
    review: Optional[dict] = None  # {"file", "excluded": [files], "relabelled": {file: class}}, paths as in split

    def describe(self, model):
        """A checkpoint of model's weights (best.pth; last.pth adds the training state)."""
        return {"model": model.state_dict(), "classes": self.classes, "variant": self.variant,
                "image_size": self.image_size[1], "image_size_schedule": list(self.image_size),
                "val_resize": self.preprocessing.resize,
                "val_crop": self.preprocessing.crop, "mean": list(self.preprocessing.mean),
                "std": list(self.preprocessing.std), "split": self.split, "args": self.args,
                "review": self.review}


def preprocessing_of(loaded):
    """The evaluation Preprocessing a checkpoint records; older files record one image_size for both."""
    crop = int(loaded.get("val_crop") or loaded.get("image_size") or 224)
    return Preprocessing(int(loaded.get("val_resize") or crop), crop,
                         tuple(loaded.get("mean", MEAN)), tuple(loaded.get("std", STD)))


# ---------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------
def save_checkpoint(obj, path, hint=DISK_HINT):
    atomic_write(path, lambda f: torch.save(obj, f), hint)


def write_class_indices(path, classes, hint=DISK_HINT):
    atomic_write_text(path, json.dumps({str(i): c for i, c in enumerate(classes)}, indent=4) + "\n", hint)


def read_class_indices(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return [data[str(i)] for i in range(len(data))]
    except FileNotFoundError:
        raise UserError(f"class index file {path} does not exist: pass --class-indices, or use a "
                        "checkpoint written by train.py, which holds its class names") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a class index file like {{\"0\": \"daisy\", ...}}") from None


def load_checkpoint(path, option="--weights"):
    """The checkpoint dict; a plain state dict comes back as {"model": state_dict}."""
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist: train first (python train.py) "
                        f"or pass {option} with the right path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a readable PyTorch weights file (damaged, or another format): "
                        "pass a best.pth or last.pth written by train.py, or a saved state dict") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise UserError(f"{path} holds neither a checkpoint nor a state dict")


def clean_state_dict(state_dict):
    """Strip the 'module.' prefix that DataParallel/DDP wrappers add, if every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def guess_variant(state_dict):
    return "torchvision" if any(".bn." in k for k in state_dict) else "paper"


def load_weights(model, state_dict, path, reinit_heads=False):
    """Load state_dict into model, allowing exactly the differences that are expected.

    - aux1.*/aux2.* keys are dropped when the model has no aux heads (prediction), and the rotation
      head's when it has none (fine-tuning without --rotation-weight);
    - with reinit_heads, class-count-dependent head layers whose shapes differ keep their fresh
      initialisation (fine-tuning on new classes), and so does a rotation head the weights lack;
      their names are returned.
    Any other missing, unexpected or misshaped key is an error that names the keys.
    """
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    if not getattr(model, "aux_logits", True):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(AUX_PREFIXES)}
    if getattr(model, "rotation", None) is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ROTATION_PREFIX)}
    fresh = sorted(k for k in own if k.startswith(ROTATION_PREFIX) and k not in state_dict) if reinit_heads else []
    missing = sorted(set(own) - set(state_dict) - set(fresh))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise UserError(f"{path} does not fit this GoogLeNet ({model.variant} variant): "
                        f"{'; '.join(parts)}. Use weights trained with this repository's model.py")
    misshaped = sorted(k for k in own if k not in fresh and own[k].shape != state_dict[k].shape)
    reinit = [k for k in misshaped if reinit_heads and k.startswith(HEAD_PREFIXES)]
    wrong = [k for k in misshaped if k not in reinit]
    if wrong:
        details = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:6])
        details += f" and {len(wrong) - 6} more" if len(wrong) > 6 else ""  # the 6 heads all show
        hint = ""
        if any(k.startswith(HEAD_PREFIXES) for k in wrong):
            hint = (f" The weights are for {state_dict['fc.weight'].shape[0]} classes and the model has "
                    f"{own['fc.weight'].shape[0]}: use the class index file that came with them.")
        raise UserError(f"{path} does not fit this model: {details}.{hint}")
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise UserError(f"{path} holds weights that are NaN or infinite ({_names(broken)}): it comes from a "
                        "run that diverged, or the file is damaged; use another checkpoint (best.pth keeps "
                        "the last good weights of a run)")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in reinit}, strict=not (reinit or fresh))
    return sorted({k.rsplit(".", 1)[0] for k in reinit + fresh})


def _names(keys):
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_classes(path, trained_on, classes, what):
    """A checkpoint's classes against the data's: one line naming both when they differ."""
    if trained_on and trained_on != classes:
        raise UserError(f"{path} was trained on classes {trained_on}, {what} has {classes}: "
                        "use data with the same class folders")


def load_model(weights, class_indices, device, loaded=None):
    """The eval-mode GoogLeNet without aux heads (with the rotation head where the weights have one),
    on device in channels_last, for prediction and export: (model, classes, Preprocessing). loaded:
    the checkpoint of weights, if read already."""
    loaded = load_checkpoint(weights) if loaded is None else loaded
    state_dict = clean_state_dict(loaded["model"])
    classes = loaded.get("classes") or read_class_indices(class_indices)
    variant = loaded.get("variant") or guess_variant(state_dict)
    rotation_head = any(k.startswith(ROTATION_PREFIX) for k in state_dict)  # its "not sure" score may use it
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, variant=variant, rotation_head=rotation_head)
    # Only weights with this model's layers can be for another class count; for any other network
    # (a ResNet has an fc.weight too) load_weights below names the keys that do not fit.
    if (set(model.state_dict()) <= set(state_dict) and "fc.weight" in state_dict
            and state_dict["fc.weight"].shape[0] != len(classes)):
        raise UserError(f"{weights} is for {state_dict['fc.weight'].shape[0]} classes but "
                        f"{class_indices} names {len(classes)}: use the class index file "
                        "written with these weights")
    load_weights(model, state_dict, weights)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, classes, preprocessing_of(loaded)

