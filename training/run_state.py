"""What last.pth adds to a checkpoint so that --resume continues a run bit for bit: the training
objects' state, where the run stands (Progress), and every process's random number generators."""
import random
import shlex
from dataclasses import dataclass, field
from typing import Optional

import torch

from inference.checkpoint import CheckpointError, load_weights, save_checkpoint
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
