"""What last.pth adds to a checkpoint so that --resume continues a run bit for bit (on a CPU; on a GPU
within float rounding, see resume_promise): the training objects' state, where the run stands
(Progress), and every process's random number generators."""
import argparse
import os
import random
import shlex
from dataclasses import dataclass, field
from typing import Optional

import torch

from inference.checkpoint import load_weights, save_checkpoint
from plumbing.options import UserError
from training.schedule import Plan


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


def restore_training(resume, path, state, rank, device, plan):
    """Put last.pth's state back into the training objects and this process's RNGs (device: its own); the Progress.
    A --time-budget run's saved plan is loaded into plan (which the learning-rate schedule holds);
    any other keeps the plan of this session's --epochs."""
    load_weights(state.model, resume["model"], path)
    if state.ema is not None:
        if "model_ema" not in resume:
            raise UserError(f"{path} was saved without --model-ema: resume without it")
        state.ema.load_state_dict(resume["model_ema"])
    state.optimizer.load_state_dict(resume["optimizer"])
    state.scheduler.load_state_dict(resume["scheduler"])
    if resume["scaler"]:  # empty from a run without fp16 (--amp auto chose bf16 or fp32 where it ran): a new scale
        state.scaler.load_state_dict(resume["scaler"])
    restore_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0], device)
    saved_plan = resume.get("plan")
    if plan.budget_s:
        if not saved_plan or not saved_plan["budget_s"]:
            raise UserError(f"{path} was not a --time-budget run: resume it without --time-budget")
        plan.load(saved_plan)
    elif saved_plan and saved_plan["budget_s"]:
        raise UserError(f"{path} is a --time-budget run: resume it with --time-budget "
                        f"{saved_plan['budget_s'] / 60:g}")
    return Progress(plan=plan, epoch=resume["epoch"], step=resume["step"], loss_sum=resume["epoch_loss_sum"],
                    seen=resume["epoch_seen"], correct=resume.get("epoch_correct", 0),
                    best_score=resume.get("best_score", resume.get("best_acc")),  # best_acc: files before --best-metric
                    best_epoch=resume["best_epoch"], bad_images=list(resume.get("bad_images", [])))


# On --resume the options recorded in last.pth are the run's. These only change how it runs, not
# what it computes, and may be given anew (each said in a line); any other option given with a
# value other than the run's is refused, and these are not the run's to keep.
HOW_IT_RUNS = ("workers", "device", "cache", "compile", "channels_last", "tensorboard", "save_every",
               "bad_images", "output_dir", "class_indices")
NOT_THE_RUNS = ("resume", "overwrite", "download", "data_url", "data_sha256", "eval_only", "tta", "unknowns")
PATHS = ("data_path", "output_dir", "class_indices", "weights")  # recorded as typed, relative to the run's cwd


def recorded_options(args):
    """The options a checkpoint records: every one, and the folder relative paths were given from."""
    return {**vars(args), "cwd": os.getcwd()}


def resumed_args(args, given, resume, path, world_size, log):
    """The options of the run saved in last.pth (resume), with those given on the command line
    (given: the options typed, with their values) that only change how it runs; world_size must be
    the run's, since each process's data order and random state were saved."""
    recorded = dict(resume.get("args") or {})
    cwd = recorded.pop("cwd", None)
    for key in PATHS:  # a path given relative to the run's folder at the time, from wherever it is resumed
        if cwd and isinstance(recorded.get(key), str) and recorded[key] not in ("", "imagenet"):
            recorded[key] = os.path.normpath(os.path.join(cwd, recorded[key]))
    if recorded.get("channels_last") in ("on", "off"):  # files from before --channels-last was a flag
        recorded["channels_last"] = recorded["channels_last"] == "on"
    merged = {**vars(args), **{k: v for k, v in recorded.items() if k in vars(args) and k not in NOT_THE_RUNS}}
    merged["output_dir"] = os.path.dirname(path) or "."
    saved_processes = len(resume.get("rng") or [None])
    if world_size != saved_processes:
        raise UserError(f"{path} was saved by a run of {saved_processes} process(es) and this one has "
                        f"{world_size}: their data order differs; resume it with as many processes")
    # options newer than the run: not recorded, so no value given can be told to be the run's
    unrecorded = [k for k in vars(args) if k not in recorded and k not in HOW_IT_RUNS + NOT_THE_RUNS]
    for key in (k for k in unrecorded if k in given):
        flag = "--" + key.replace("_", "-")
        raise UserError(f"{flag} {given[key]}: {path} does not record {flag} (its run is older than the "
                        f"option): leave {flag} out to continue the run with its default, or start a new run with it")
    if unrecorded:
        log(f"resume: {path} does not record the options newer than its run, which keep their defaults: "
            + ", ".join(f"--{k.replace('_', '-')} {merged[k]}" for k in unrecorded))
    for key, value in given.items():
        old = merged[key]
        if key in PATHS and isinstance(value, str) and value not in ("", "imagenet"):
            value = os.path.normpath(os.path.abspath(value))
            old = os.path.normpath(os.path.abspath(old)) if isinstance(old, str) else old
        if key in NOT_THE_RUNS or value == old:
            continue
        flag = "--" + key.replace("_", "-")
        if key in HOW_IT_RUNS:
            merged[key] = value
            log(f"resume: {flag} {value} (the run had {'the default' if old is None else old})")
        elif key == "epochs":
            raise UserError(f"--epochs {value}: the run saved in {path} was planned for {old} epochs, which its "
                            "learning-rate schedule follows; to train longer, start a new run from its weights: "
                            f"python train.py --weights {os.path.join(os.path.dirname(path), 'best.pth')} "
                            f"--epochs N --output-dir NEW_FOLDER")
        else:
            raise UserError(f"{flag} {value} differs from the run's {old}: --resume continues the run as it was "
                            f"saved in {path}; leave {flag} out, or start a new run with it")
    merged["resume"] = path
    return argparse.Namespace(**merged)


def resume_command(last_path):
    """The command that continues a run: last.pth records everything else."""
    return f"python train.py --resume {shlex.quote(last_path)}"  # quoted: paths may hold spaces


def capture_rng_state(device):
    """This process's generators: Python's, the CPU's, and that of its own GPU (device) only, so that
    a run resumes on a machine with fewer GPUs (one process on cuda:0 of a 4-GPU machine, say)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state, device):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    gpu = state.get("cuda") if device.type == "cuda" else None
    if isinstance(gpu, list):  # a last.pth from before: every GPU's state, in the order of their indices
        gpu = gpu[device.index] if device.index < len(gpu) else None
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)


def resume_promise(device):
    """How closely a resumed run follows the uninterrupted one, for the resuming line."""
    if device.type == "cpu":
        return "bit for bit"
    return ("not bit for bit on a GPU: the fastest kernels are picked afresh (cudnn.benchmark) and some add "
            "in a varying order, so the weights drift apart within float rounding")


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
