"""The one checkpoint format: writing it, reading it back, and loading weights into the model.

A checkpoint is a dict with the weights under "model" and what predict.py needs to use them
("classes", "variant", "image_size", "val_resize", "val_crop", "mean", "std"), the run's "split"
and "args"; last.pth adds the state to continue ("optimizer", "scheduler", "scaler", "model_ema",
the Progress fields and every process's "rng"). A plain state dict (the classic ``googleNet.pth``)
loads too; its classes then come from class_indices.json.
"""
import json
import os
import random
import shlex
from dataclasses import dataclass, field
from typing import Optional

import torch

from atomic import DISK_HINT, atomic_write, atomic_write_text
from images import MEAN, STD, Preprocessing
from model import AUX_PREFIXES, HEAD_PREFIXES, GoogLeNet
from options import UserError
from schedule import Plan


class CheckpointError(UserError):
    """A weights file that is missing, unreadable or for another model: the message says what to do."""


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """What every checkpoint of a run says besides the weights: the classes, the network's layout,
    the training crop and the evaluation preprocessing, the val split and the run's arguments."""

    classes: list
    variant: str
    image_size: tuple  # the training crop's (first, last) sizes: equal without progressive resizing
    preprocessing: Preprocessing
    split: Optional[dict]
    args: dict

    def describe(self, model):
        """A checkpoint of model's weights (best.pth; last.pth adds the training state)."""
        return {"model": model.state_dict(), "classes": self.classes, "variant": self.variant,
                "image_size": self.image_size[1], "image_size_schedule": list(self.image_size),
                "val_resize": self.preprocessing.resize,
                "val_crop": self.preprocessing.crop, "mean": list(self.preprocessing.mean),
                "std": list(self.preprocessing.std), "split": self.split, "args": self.args}


@dataclass
class Progress:
    """Where a run stands: what last.pth saves so that --resume continues bit for bit, from the
    end of an epoch or from the middle of one."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps done in the current epoch
    loss_sum: float = 0.0  # this process's sum of step loss x images over those steps
    seen: int = 0  # images of those steps
    correct: int = 0  # of them classified right
    best_score: float = 0.0  # the best --best-metric so far
    best_epoch: int = 0
    bad_images: list = field(default_factory=list)  # images found unreadable after the start-up check
    plan: Optional[Plan] = None  # how many epochs, and with --time-budget how they were planned

    def add_step(self, loss, images, correct):
        self.step += 1
        self.loss_sum += loss * images
        self.seen += images
        self.correct += correct

    def end_epoch(self, score):
        """Count the epoch as done; True when its score is the best so far (the first always is)."""
        improved = score > self.best_score or self.best_epoch == 0
        self.epoch += 1
        if improved:
            self.best_score, self.best_epoch = score, self.epoch
        self.step, self.loss_sum, self.seen, self.correct = 0, 0.0, 0, 0
        return improved


@dataclass
class TrainingState:
    """The objects whose state last.pth saves beside the Progress (ema: None without --model-ema)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Optional[torch.nn.Module]


def training_checkpoint(record, state, progress, rngs):
    """last.pth's payload: the model's checkpoint, its training state, the progress and rngs (every
    process's RNG state, in rank order)."""
    payload = record.describe(state.model)
    payload.update(optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                   scaler=state.scaler.state_dict(), epoch=progress.epoch, step=progress.step,
                   epoch_loss_sum=progress.loss_sum, epoch_seen=progress.seen, epoch_correct=progress.correct,
                   best_score=progress.best_score, best_epoch=progress.best_epoch, bad_images=progress.bad_images,
                   plan=progress.plan.to_dict(), rng=rngs)
    if state.ema is not None:
        payload["model_ema"] = state.ema.state_dict()
    return payload


def save_training(path, record, state, progress, rngs):
    """Write last.pth (atomically: a failed save leaves the previous one whole)."""
    save_checkpoint(training_checkpoint(record, state, progress, rngs), path,
                    "the previous file is intact; free some disk space and resume from it")


def restore_training(resume, path, state, rank, plan):
    """Put last.pth's state back into the training objects and this process's RNGs; the Progress.
    A --time-budget run's saved plan is loaded into plan (which the learning-rate schedule holds);
    any other keeps the plan of this session's --epochs."""
    load_weights(state.model, resume["model"], path)
    if state.ema is not None:
        if "model_ema" not in resume:
            raise CheckpointError(f"{path} was saved without --model-ema: resume without it")
        state.ema.load_state_dict(resume["model_ema"])
    state.optimizer.load_state_dict(resume["optimizer"])
    state.scheduler.load_state_dict(resume["scheduler"])
    state.scaler.load_state_dict(resume["scaler"])
    restore_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
    saved_plan = resume.get("plan")
    if plan.budget_s:
        if not saved_plan or not saved_plan["budget_s"]:
            raise CheckpointError(f"{path} was not a --time-budget run: resume it without --time-budget")
        plan.load(saved_plan)
    elif saved_plan and saved_plan["budget_s"]:
        raise CheckpointError(f"{path} is a --time-budget run: resume it with --time-budget "
                              f"{saved_plan['budget_s'] / 60:g}")
    return Progress(plan=plan, epoch=resume["epoch"], step=resume["step"], loss_sum=resume["epoch_loss_sum"],
                    seen=resume["epoch_seen"], correct=resume.get("epoch_correct", 0),
                    best_score=resume.get("best_score", resume.get("best_acc")),  # best_acc: files before --best-metric
                    best_epoch=resume["best_epoch"], bad_images=list(resume.get("bad_images", [])))


def resume_command(args, defaults, last_path):
    """train.py's arguments that continue this run: --resume and every option not at its default."""
    parts = [f"--resume {shlex.quote(last_path)}"]  # quoted: paths may hold spaces
    for key, value in vars(args).items():
        if key in ("resume", "download", "data_url", "data_sha256") or value == getattr(defaults, key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])  # flags that default to on have a --no- form
        elif isinstance(value, tuple):  # --image-size FIRST:LAST
            parts.append(f"{flag} {':'.join(str(v) for v in dict.fromkeys(value))}")
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


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
        raise CheckpointError(f"class index file {path} does not exist: pass --class-indices, or use a "
                              "checkpoint written by train.py, which holds its class names")
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a class index file like {{\"0\": \"daisy\", ...}}")


def load_checkpoint(path, option="--weights"):
    """The checkpoint dict; a plain state dict comes back as {"model": state_dict}."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path} does not exist: train first (python train.py) "
                              f"or pass {option} with the right path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"{path} is not a readable PyTorch weights file (damaged, or another format): "
                              "pass a best.pth or last.pth written by train.py, or a saved state dict")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise CheckpointError(f"{path} holds neither a checkpoint nor a state dict")


def clean_state_dict(state_dict):
    """Strip the 'module.' prefix that DataParallel/DDP wrappers add, if every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def guess_variant(state_dict):
    return "torchvision" if any(".bn." in k for k in state_dict) else "paper"


def load_weights(model, state_dict, path, reinit_heads=False):
    """Load state_dict into model, allowing exactly the differences that are expected.

    - aux1.*/aux2.* keys are dropped when the model has no aux heads (prediction);
    - with reinit_heads, class-count-dependent head layers whose shapes differ keep their fresh
      initialisation (fine-tuning on new classes); their names are returned.
    Any other missing, unexpected or misshaped key is an error that names the keys.
    """
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    if not getattr(model, "aux_logits", True):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(AUX_PREFIXES)}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise CheckpointError(f"{path} does not fit this GoogLeNet ({model.variant} variant): "
                              f"{'; '.join(parts)}. Use weights trained with this repository's model.py")
    misshaped = sorted(k for k in own if own[k].shape != state_dict[k].shape)
    reinit = [k for k in misshaped if reinit_heads and k.startswith(HEAD_PREFIXES)]
    wrong = [k for k in misshaped if k not in reinit]
    if wrong:
        details = ", ".join(f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:6])
        details += f" and {len(wrong) - 6} more" if len(wrong) > 6 else ""  # the 6 heads all show
        hint = ""
        if any(k.startswith(HEAD_PREFIXES) for k in wrong):
            hint = (f" The weights are for {state_dict['fc.weight'].shape[0]} classes and the model has "
                    f"{own['fc.weight'].shape[0]}: use the class index file that came with them.")
        raise CheckpointError(f"{path} does not fit this model: {details}.{hint}")
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path} holds weights that are NaN or infinite ({_names(broken)}): it comes from a "
                              "run that diverged, or the file is damaged; use another checkpoint (best.pth keeps "
                              "the last good weights of a run)")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in reinit}, strict=not reinit)
    return sorted({k.rsplit(".", 1)[0] for k in reinit})


def _names(keys):
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_classes(path, trained_on, classes, what):
    """A checkpoint's classes against the data's: one line naming both when they differ."""
    if trained_on and trained_on != classes:
        raise CheckpointError(f"{path} was trained on classes {trained_on}, {what} has {classes}: "
                              "use data with the same class folders")


def load_model(weights, class_indices, device):
    """The eval-mode GoogLeNet without aux heads, on device in channels_last, for prediction and
    export: (model, classes, Preprocessing)."""
    loaded = load_checkpoint(weights)
    state_dict = clean_state_dict(loaded["model"])
    classes = loaded.get("classes") or read_class_indices(class_indices)
    variant = loaded.get("variant") or guess_variant(state_dict)
    model = GoogLeNet(num_classes=len(classes), aux_logits=False, variant=variant)
    # Only weights with this model's layers can be for another class count; for any other network
    # (a ResNet has an fc.weight too) load_weights below names the keys that do not fit.
    if (set(model.state_dict()) <= set(state_dict) and "fc.weight" in state_dict
            and state_dict["fc.weight"].shape[0] != len(classes)):
        raise CheckpointError(f"{weights} is for {state_dict['fc.weight'].shape[0]} classes but "
                              f"{class_indices} names {len(classes)}: use the class index file "
                              "written with these weights")
    load_weights(model, state_dict, weights)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, classes, preprocessing_of(loaded)


# ---------------------------------------------------------------------------------------------
# RNG states, for an exact resume
# ---------------------------------------------------------------------------------------------
def capture_rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
