"""Train GoogLeNet on a folder of photos, validating every epoch and keeping the best weights.

    python train.py --data-path DIR                    # DIR/<class>/ or DIR/{train,val}/<class>/
    python train.py --resume weights/last.pth          # continue an interrupted run
    torchrun --nproc_per_node=2 train.py ...           # data-parallel, one process per GPU

The file reads as torchvision's classification reference script does: train_one_epoch (one screen:
forward, the paper's three losses, backward, step; training/step.py holds what the options add),
fit (the epoch loop: train, validate with training/evaluation.py's evaluate, save), main (set-up,
data, model, --eval-only, the training objects, resume, then fit), the helpers, and
get_args_parser last, its groups those of docs/options.md. What the run keeps fixed travels in Run,
what moves in run_state.Progress.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from data_set import review
from inference import calibration
from inference import checkpoint as ckpt
from inference.images import Preprocessing
from model import AUX_PREFIXES, HEAD_PREFIXES, ROTATION_PREFIX, VARIANTS, GoogLeNet
from plumbing import device as dev
from plumbing import distributed, options
from plumbing.atomic import remove_stale_temp_files
from plumbing.options import UserError
from plumbing.run_lock import RunLock, probe_writable
from plumbing.stopping import StopRequest
from training import data, download, evaluation, leakage, metrics, recipe, run_state, schedule, step
from training.labels import write_suspect_labels
from training.metrics import (
    BEST_METRICS,
    TensorBoardLog,
)
from training.outliers import OutlierMaker
from training.pixmix import PixMixer
from training.rotation import Rotator
from training.step import TrainingError

IMAGENET_URL = "https://download.pytorch.org/models/googlenet-1378be20.pth"
clock = time.perf_counter  # every duration the run measures, --time-budget's included
DEFAULT_DATA = os.path.join("data_set", "flower_data")
# The default recipe (see README's results): the torchvision layout, AdamW with a cosine schedule,
# TrivialAugment, random erasing, label smoothing and an EMA of the weights, at 128 px.
DEFAULT_VARIANT = "torchvision"
# --energy-margins: Liu et al. used -25 and -7 fine-tuning a CIFAR-10 network whose energies lay low
# already. From scratch every energy starts near -log(classes), -1.6 for 5: with -25 the photos' hinge
# starts at about 550 a head, 50 x the class loss, which it drowns for epochs (a 1-epoch smoke run:
# train loss 107). -7 and -2 keep a gap of 5 nats, and a first hinge about the size of the class loss.
ENERGY_MARGINS = (-7.0, -2.0)
OUTLIER_WEIGHTS = {"uniform": 0.5, "energy": 0.1}  # --outlier-weight's default for each --outlier-loss
# torch.compile's backend for --compile: PyTorch's default (inductor) unless this variable names
# another; the test suite sets aot_eager, which runs --compile's wiring on a CPU in seconds
COMPILE_BACKEND = "GOOGLENET_COMPILE_BACKEND"


def train_one_epoch(training, loaders, run, progress):
    """One pass over loaders.train, counting every step into progress (which may start mid-epoch); ends
    early, with stopped=True, when a stop is requested."""
    model, criterion, args = training.forward, training.criterion, run.args
    optimizer, scaler = training.state.optimizer, training.state.scaler
    step.train_mode(model, args.freeze_layers)
    bar = epoch_bar(loaders.train, loaders.crop, run, progress)
    meter = step.EpochMeter(run.device, counts_correct=training.mix is None)
    optimizer.zero_grad(set_to_none=True)
    for chunk in step.chunks(bar, training, run, progress):  # each batch, in chunks of --micro-batch photos
        with step.forward_context(model, chunk, run):  # autocast; under DDP, gradients sync on a step's last chunk
            outputs = model(chunk.inputs)  # the chunk's photos, then its outliers and turned copies if any
        logits, aux2, aux1 = chunk.photo_outputs(outputs)
        y = chunk.targets  # the paper's loss: the main classifier's plus 0.3 x each auxiliary one's
        loss = criterion(logits, y) + args.aux_weight * (criterion(aux1, y) + criterion(aux2, y))
        loss = step.weigh(loss, outputs, chunk, args)  # x the chunk's share; + the rotation and outlier losses
        scaler.scale(loss).backward()
        meter.add(loss, logits, chunk)
        if not chunk.last:  # gradients add up over a step's chunks
            continue
        step_loss, stopping = step.vote(training.stop, loaders.train, run, meter.take_step_loss(), progress)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step.average_weights(training.state, args)  # --model-ema
        progress.add_step(step_loss, chunk.step_images, 0)  # its right answers are counted in meter
        log_step(run, bar, progress, step_loss)
        if stopping:
            bar.close()
            return meter.stopped(progress)
        if args.save_every and progress.step % args.save_every == 0:
            meter.count_into(progress)
            save_last(run, training.state, progress)
    bar.close()
    return meter.result(progress)


def fit(run, training, loaders, progress):
    """The epoch loop, from where progress stands to the plan's last epoch: train, validate, save.
    Returns the exit code."""
    args, log, plan = run.args, print if run.is_main else silent, progress.plan
    state = training.state
    # validated (and saved as best.pth) eagerly, even with --compile: its scores, which choose best.pth,
    # are then those that predict.py and --eval-only get from that file, and a forward-only pass over a
    # tenth of the images would pay for a compilation of its own (eval mode, the EMA's module, another size)
    validated = state.ema.module if state.ema is not None else state.model
    leakage_checked = False  # once a session, when a whole epoch has decoded every image
    while progress.epoch < plan.epochs:
        epoch, whole = progress.epoch, progress.step == 0
        if schedule.out_of_patience(args, progress):
            log(schedule.out_of_patience(args, progress))
            break
        size = schedule.image_size(epoch, plan, args.image_size)
        data.with_crop(loaders, size, args, run.device)
        loaders.train.sampler.set_epoch(epoch, skip=progress.step * args.batch_size)
        epoch_start = clock()
        result = train_one_epoch(training, loaders, run, progress)
        if result.stopped:
            save_last(run, state, progress)
            if run.tensorboard:
                run.tensorboard.close()
            signum = training.stop.signal or signal.SIGTERM  # another process may have caught it
            log(f"\n{signal.Signals(signum).name}: stopped at epoch {epoch + 1}, step {progress.step}; saved "
                f"{run.last_path}. Resume with:\n  " + run_state.resume_command(run.last_path))
            return 128 + signum
        trained = clock()
        if run.world_size > 1:
            distributed.check_in_sync(state.model, state.ema, run.device)
        val = evaluation.evaluate(validated, loaders.val, training.criterion, run)
        found = data.newly_unreadable(run.args.bad_images, run.device, (loaders.train, loaders.val), progress)
        if found:
            log(f"found {len(found)} unreadable image(s) in epoch {epoch + 1}, left out from now on: "
                + "; ".join(found))
        if whole and not leakage_checked:
            leakage.check_leakage(loaders.train.dataset, loaders.val.dataset, args.output_dir, args.data_path,
                               run.device, log)
            leakage_checked = True
        if not math.isfinite(val.loss):  # the last step's update broke the weights: never save them
            raise TrainingError(f"the validation loss became {val.loss} after epoch {epoch + 1}: training "
                                "diverged; lower --lr (best.pth was not touched)")
        if whole:  # a budget run plans from whole epochs only (a resumed one's first is partial)
            plan.measured.append([size, trained - epoch_start, clock() - trained])
        decision = schedule.replan(plan, epoch + 1, run.elapsed(), args.image_size)
        if decision:
            log(decision)
        lr = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step()  # the next epoch's rate, on the plan as it is now
        seconds = clock() - epoch_start
        improved = progress.end_epoch(val.scores[args.best_metric])
        distributed.run_on_main(run.device, metrics.report_epoch, run, progress.epoch, lr, result, val, seconds)
        if improved:
            payload = run.record.describe(validated)
            payload.update(epoch=progress.epoch, val_accuracy=val.accuracy, val_scores=val.scores)
            distributed.run_on_main(run.device, ckpt.save_checkpoint, payload, run.best_path,
                                    "the previous file is intact; free some disk space and resume from last.pth")
        save_last(run, state, progress)
    write_suspect_labels(validated, loaders, run, log)
    if run.tensorboard:
        run.tensorboard.close()
    evaluation.calibrate_best(run, copy.deepcopy(validated), loaders.val, training.criterion, log)
    if run.world_size > 1:
        log(f"ranks in sync: the {run.world_size} processes held identical weights after every epoch")
    took = f"; {run.elapsed() / 60:.1f} of {plan.budget_s / 60:g} min" if plan.budget_s else ""
    gpu = (f", GPU {torch.cuda.max_memory_allocated(run.device) / 2 ** 30:.1f} GiB allocated at most"
           if run.device.type == "cuda" else "")
    log(f"best val_{args.best_metric} {progress.best_score:.3f} at epoch {progress.best_epoch}, saved in "
        f"{run.best_path}{took}; peak memory {dev.peak_rss_gib():.1f} GiB{gpu}")
    return 0


def main(args, given, cleanup):
    """The run, straight down. given: the options typed on the command line (--resume keeps the
    others as the run had them); cleanup: what run() undoes however this ends."""
    started = clock()
    rank, world_size, local_rank = distributed.init()
    cleanup.callback(distributed.close)
    log = print if rank == 0 else silent
    # --calibrate rewrites --weights: their folder's lock comes before they are read or anything is made
    weights_lock = distributed.run_on_main(distributed.early_device(), evaluation.lock_weights_folder, args,
                                           cleanup, log)
    resume, start, source = read_checkpoints(args)
    if resume is not None:
        args = run_state.resumed_args(args, given, resume, args.resume, world_size, log)
    placement = dev.place(args.device, args.amp, local_rank)
    if placement.warning:
        log(placement.warning)
    preprocessing = evaluation_sizes(args, start)
    # a run continues on its own split; fine-tuning from --weights splits the new data afresh
    recorded_split = (resume or (start if args.eval_only else None) or {}).get("split")
    evaluation.check_calibrate(args, start, preprocessing)
    found = load_data(args, placement.device, recorded_split, log, (start or {}).get("classes"),  # lists files only
                      resume)
    lock = RunLock(args.output_dir, purpose="evaluation" if args.eval_only else "training", log=log)
    cleanup.callback(lock.release)  # one run per output folder: rank 0 takes it, however the run ends it goes
    distributed.run_on_main(placement.device, prepare_output_dir, args, lock, weights_lock)
    if resume is not None:
        ckpt.check_classes(args.resume, resume.get("classes"), found.classes, "the data")
    loaders = data.build_loaders(args, found, preprocessing, placement.device, rank, world_size, log)
    first, last = args.image_size
    crops = f"{first}" if first == last else f"{first} to {last}"
    log(f"data: {len(found.classes)} classes {found.classes}; "
        + ("" if args.eval_only else f"{len(loaders.train.dataset)} train, ")
        + f"{len(loaders.val.dataset)} val images "
        + ("(" if args.eval_only else f"({crops} px training crops, ") + f"evaluation at {preprocessing.crop} px); "
        f"device {placement.device}, {placement.precision}; {loaders.workers} loader workers; {world_size} process(es)")
    if not args.eval_only and trust_options(args):
        log(f"not sure: {trust_options(args)}")

    torch.manual_seed(args.seed)
    model = build_model(args, found.classes, resume or start, start, source, placement.device, log)
    run = Run(args, rank, world_size, placement,
              ckpt.Record(found.classes, model.variant, args.image_size, preprocessing, found.split,
                          run_state.recorded_options(args), found.review))
    criterion = recipe.ClassWeightedLoss(recipe.class_weights(args, loaders.train, placement.device),
                                         args.label_smoothing, 0.0 if args.eval_only else args.logit_norm)
    if args.eval_only:
        with data.worker_failures():
            return evaluation.evaluate_only(run, compiled(model) if args.compile else model, criterion, loaders.val,
                                            start, log)

    plan = (schedule.budget_plan(args.time_budget, args.epochs) if args.time_budget
            else schedule.fixed_plan(args.epochs or 25))
    training = build_training(args, run, model, criterion, plan)
    progress = run_state.Progress(plan=plan)
    if resume is not None:
        progress = run_state.restore_training(resume, args.resume, training.state, rank, placement.device, plan)
        for loader in (loaders.train, loaders.val):
            loader.dataset.mark_unreadable(progress.bad_images)
        log(f"resuming {args.resume}: epoch {progress.epoch + 1}, step {progress.step}, "
            f"best {args.best_metric} {progress.best_score:.3f}; it continues {run_state.resume_promise(run.device)}")
    distributed.run_on_main(placement.device, write_class_index_files, args, found.classes)
    steps_per_epoch = math.ceil(loaders.train.sampler.epoch_length / args.batch_size)
    tensorboard = None
    if args.tensorboard:
        next_step = progress.epoch * steps_per_epoch + progress.step + 1
        tensorboard = distributed.run_on_main(placement.device, open_tensorboard, args.output_dir, next_step)
    run = dataclasses.replace(run, steps_per_epoch=steps_per_epoch, tensorboard=tensorboard, started=started,
                              time_before=plan.elapsed_s)
    try:
        with data.worker_failures():
            return fit(run, training, loaders, progress)
    except torch.OutOfMemoryError as e:
        raise out_of_memory(run, progress) from e


# ---------------------------------------------------------------------------------------------
# What a run carries
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What stays fixed for the whole run: its options, the processes, where and in which precision
    the model runs, what every checkpoint records, and where they go."""

    args: argparse.Namespace
    rank: int
    world_size: int
    placement: dev.Placement
    record: ckpt.Record
    steps_per_epoch: int = 0
    tensorboard: Optional[TensorBoardLog] = None
    started: float = 0.0  # clock() when this session started
    time_before: float = 0.0  # seconds the run took in the sessions before this one (--resume)

    def elapsed(self):
        """Seconds of the whole run so far, its earlier sessions included (what --time-budget counts)."""
        return self.time_before + clock() - self.started

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def device(self):
        return self.placement.device

    @property
    def best_path(self):
        return os.path.join(self.args.output_dir, "best.pth")

    @property
    def last_path(self):
        return os.path.join(self.args.output_dir, "last.pth")


@dataclass
class Training:
    """The objects a training step uses. forward is the model as it runs (wrapped in
    DistributedDataParallel under torchrun, then compiled with --compile); state.model is the model
    itself, whose weights the checkpoints hold."""

    forward: nn.Module
    state: run_state.TrainingState
    criterion: nn.Module
    mix: Optional[nn.Module]
    outliers: Optional[OutlierMaker]  # --outliers
    stop: StopRequest
    pixmix: Optional[PixMixer] = None  # --pixmix
    rotator: Optional[Rotator] = None  # --rotation-weight


# ---------------------------------------------------------------------------------------------
# The epoch's helpers
# ---------------------------------------------------------------------------------------------
def epoch_bar(loader, crop, run, progress):
    """The epoch's progress bar (rank 0 only), starting where a resumed epoch stands."""
    plan = progress.plan
    return tqdm(loader, desc=f"train {progress.epoch + 1}/{plan.epochs if plan.planned else '?'} ({crop} px)",
                disable=not run.is_main, initial=progress.step, total=progress.step + len(loader), file=sys.stdout,
                dynamic_ncols=True)


def log_step(run, bar, progress, step_loss):
    if run.tensorboard:
        run.tensorboard.add({"train/step_loss": step_loss}, progress.epoch * run.steps_per_epoch + progress.step)
    bar.set_postfix(loss=f"{step_loss:.3f}")


def save_last(run, state, progress):
    """last.pth, with every process's RNG state (gathered from all of them, written by rank 0)."""
    progress.plan.elapsed_s = run.elapsed()
    rngs = distributed.all_gather(run_state.capture_rng_state(run.device), run.device)
    distributed.run_on_main(run.device, run_state.save_training, run.last_path, run.record, state, progress, rngs)


def out_of_memory(run, progress):
    """The line that torch.OutOfMemoryError in training ends with: the options that need less memory
    (each changes what the run computes, so a new run), and what this one kept."""
    args = run.args
    saved = args.resume or progress.epoch > 0 or (args.save_every and progress.step >= args.save_every)
    kept = (f"{run.last_path} keeps the run as last saved ({run_state.resume_command(run.last_path)} continues "
            "it as it was, where more memory is free)" if saved else "nothing was saved yet")
    return TrainingError(f"out of memory on {run.device} in epoch {progress.epoch + 1} with --batch-size "
                         f"{args.batch_size}: start a new run with a smaller --batch-size, --micro-batch N (each "
                         f"step in chunks of N images) or a smaller --image-size; {kept}")


# ---------------------------------------------------------------------------------------------
# Set-up steps, in the order main() takes them
# ---------------------------------------------------------------------------------------------
def silent(*args, **kwargs):
    """The log of every process but rank 0."""


def read_checkpoints(args):
    """(--resume's last.pth, --weights' checkpoint, where --weights came from); None where not given.
    Read before the images, so a wrong path fails before minutes of decoding."""
    if args.eval_only and args.resume:  # it would score neither file's weights
        raise UserError("--eval-only scores --weights and --resume continues a training run: leave out --resume "
                        "(to score a run, pass its best.pth or last.pth as --weights)")
    resume = ckpt.load_checkpoint(args.resume, "--resume") if args.resume else None
    if resume is not None and "optimizer" not in resume:
        raise UserError(f"{args.resume} holds weights only, not a run to resume: "
                                   "pass the last.pth of the run, or use --weights to start from it")
    if args.eval_only and not args.weights:
        raise TrainingError("--eval-only needs --weights PATH: the weights to evaluate")
    if not args.weights or resume is not None:
        return resume, None, None
    if args.weights != "imagenet":
        return None, ckpt.load_checkpoint(args.weights), args.weights
    try:
        state_dict = torch.hub.load_state_dict_from_url(IMAGENET_URL, map_location="cpu", progress=True,
                                                        check_hash=True, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot download the ImageNet weights ({str(e)[:120]}): check the "
                                   f"network, or download {IMAGENET_URL} and pass --weights FILE") from e
    return None, {"model": state_dict, "variant": "torchvision"}, IMAGENET_URL


def load_data(args, device, recorded_split, log, weights_classes=None, resume=None):
    """The classes and samples of --data-path (downloaded first with --download); a recorded split
    and review (resume) are used as they were. --eval-only scores a test set:
    evaluation.find_test_data. Then DIR/review.csv's decisions (--review)."""
    if args.download:
        distributed.run_on_main(device, download_if_missing, args.data_path, args.data_url, args.data_sha256, log)
    hint = ("run `python train.py --download` to fetch and split the flower photos"
            if os.path.normpath(args.data_path) == os.path.normpath(DEFAULT_DATA) else None)
    if args.eval_only:
        found = evaluation.find_test_data(args.data_path, weights_classes, recorded_split, log, hint)
    else:
        found = data.find_data(args.data_path, args.val_ratio, args.split_seed, recorded_split, missing_hint=hint,
                               log=log)
        if data.not_sure_class(found.classes):
            raise UserError(f"{data.not_sure_class(found.classes)}: rename the folder")
    if len(found.classes) < 2 and not args.eval_only:
        only = found.classes[0]
        raise UserError(f"{args.data_path} has one class folder ({only}): a classifier needs two or "
                             f"more; if {only} holds the class folders, pass --data-path "
                             f"{os.path.join(args.data_path, only)}")
    return review.apply(found, args.data_path, args.review, log, resumed=resume is not None,
                        recorded=(resume or {}).get("review"))


def download_if_missing(root, url, sha256, log):
    if not os.path.isdir(os.path.join(root, "train")):
        download.download_and_split(root, url, sha256, log)


def prepare_output_dir(args, lock, weights_lock=None):
    """Create --output-dir, take its lock (one run per folder), prove it writable, and clear the
    temporary files of a save cut short: only now, since before the lock they could be a live run's.
    A folder that holds another run is not written over without --overwrite (or --resume).
    weights_lock: --calibrate's lock of the weights' folder, held already: the output folder's too
    when it is the same folder."""
    folder = args.output_dir
    if weights_lock is None or os.path.realpath(weights_lock.folder) != os.path.realpath(folder):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot write to output folder {folder} ({e.strerror or e}): "
                                "pass --output-dir with a writable folder, or free some disk space") from e
        lock.acquire()
    held = [f for f in ("best.pth", "last.pth") if os.path.exists(os.path.join(folder, f))]
    if held and not (args.resume or args.eval_only or args.overwrite):
        raise UserError(f"{folder} already holds a run ({', '.join(held)}): continue it with --resume "
                        f"{os.path.join(folder, 'last.pth')}, write this one elsewhere with --output-dir, "
                        "or pass --overwrite to replace it")
    try:
        probe_writable(folder)
    except OSError as e:
        raise TrainingError(f"cannot write to output folder {folder} ({e.strerror or e}): "
                            "pass --output-dir with a writable folder, or free some disk space") from e
    remove_stale_temp_files(folder)


def evaluation_sizes(args, start=None):
    """The evaluation Preprocessing: 1.25 x the last training crop unless --val-crop/--val-resize
    say otherwise; --eval-only defaults to the sizes its weights record."""
    recorded = start if args.eval_only and start is not None else {}
    crop = args.val_crop or recorded.get("val_crop") or recorded.get("image_size") or args.image_size[1] * 5 // 4
    resize = args.val_resize or (recorded.get("val_resize") if not args.val_crop else None) or crop
    if crop > resize:  # Pillow would pad the crop with black, and best.pth would pass that on
        source = ("given by --val-crop" if args.val_crop else f"recorded in {args.weights}" if recorded
                  else "1.25 x the last --image-size")
        raise UserError(f"--val-resize {resize} is smaller than the evaluation crop {crop} ({source}): the crop is "
                        f"taken from the resized image; pass --val-crop {resize} or less, or a larger --val-resize")
    return Preprocessing(resize, crop)


def build_model(args, classes, recorded, start, source, device, log):
    """GoogLeNet with aux heads, of the variant asked for or recorded, with --weights loaded."""
    variant = args.variant or DEFAULT_VARIANT
    if recorded is not None:
        variant = recorded.get("variant") or ckpt.guess_variant(ckpt.clean_state_dict(recorded["model"]))
        if args.variant and args.variant != variant:
            raise UserError(f"--variant {args.variant}, but {args.resume or args.weights} holds the "
                                       f"{variant} variant: leave out --variant")
    rotation_head = args.rotation_weight > 0
    if args.eval_only:  # the weights' own head, which their "not sure" score may use
        rotation_head = any(k.startswith(ROTATION_PREFIX) for k in ckpt.clean_state_dict(start["model"]))
    model = GoogLeNet(num_classes=len(classes), aux_logits=True, init_weights=True, variant=variant,
                      rotation_head=rotation_head)
    if start is not None:
        # fine-tuning replaces heads sized for other classes; evaluation uses the weights as they are
        reset = ckpt.load_weights(model, start["model"], source, reinit_heads=not args.eval_only)
        log(f"weights: loaded {source}" + (f"; re-initialised for {len(classes)} classes: {', '.join(reset)}"
                                          if reset else ""))
    if args.freeze_layers:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(HEAD_PREFIXES + AUX_PREFIXES + (ROTATION_PREFIX,))
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_training(args, run, model, criterion, plan):
    """The model as a step runs it, the optimizer, its schedule, the loss scaler, the EMA, the batch
    mixing, and the stop flag."""
    forward = model
    if run.world_size > 1:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if args.compile:  # DDP's model compiled, as PyTorch advises: TorchDynamo then splits the graph at DDP's
        forward = compiled(forward)  # gradient buckets, so that their all-reduce overlaps the backward pass
    optimizer = recipe.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    factor = functools.partial(schedule.lr_factor, plan=plan, warmup_epochs=args.warmup_epochs,
                               schedule=args.lr_scheduler, step_size=args.lr_step_size, gamma=args.lr_gamma)
    state = run_state.TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
                               dev.grad_scaler(run.device, run.placement.amp_dtype), recipe.build_ema(args, model))
    mix = data.build_batch_mix(args.mixup_alpha, args.cutmix_alpha, len(run.record.classes))
    mean, std = run.record.preprocessing.mean, run.record.preprocessing.std
    outliers = OutlierMaker(args.outliers, mean, std, args.seed, run.rank) if args.outliers else None
    pixmix = PixMixer(args.pixmix, args.pixmix_beta, mean, std, args.seed, run.rank) if args.pixmix else None
    rotator = Rotator(args.rotation_share, args.seed, run.rank) if args.rotation_weight else None
    return Training(forward, state, criterion, mix, outliers, StopRequest(), pixmix, rotator)


def trust_options(args):
    """The start-up line's words for the options that train the "not sure" answer; '' when none is on."""
    parts = []
    if args.logit_norm:
        parts.append(f"LogitNorm (every head's loss sees logits of norm 1/{args.logit_norm:g})")
    if args.pixmix:
        parts.append(f"PixMix with generated pictures (0 to {args.pixmix} rounds, beta {args.pixmix_beta:g})")
    if args.rotation_weight:
        parts.append(f"a rotation head (weight {args.rotation_weight:g}, {100 * args.rotation_share:g}% of each "
                     "batch turned)")
    if args.outliers:
        loss = ("uniform loss" if args.outlier_loss == "uniform" else
                "energy margins {:g} / {:g}".format(*args.energy_margins))
        parts.append(f"{args.outliers} outliers a step ({loss}, weight {args.outlier_weight:g})")
    if args.not_sure_score != calibration.DEFAULT_SCORE:
        parts.append(f"\"not sure\" score {args.not_sure_score}")
    return "; ".join(parts)


def compiled(module):
    return torch.compile(module, backend=os.environ.get(COMPILE_BACKEND, "inductor"))


def write_class_index_files(args, classes):
    """class_indices.json in --output-dir, and the copy --class-indices asks for."""
    ckpt.write_class_indices(os.path.join(args.output_dir, "class_indices.json"), classes)
    if args.class_indices:
        try:
            ckpt.write_class_indices(args.class_indices, classes)
        except OSError as e:
            raise TrainingError(f"cannot write the class index file {args.class_indices} "
                                f"({e.strerror or e}): pass --class-indices with a writable path") from e


def open_tensorboard(output_dir, next_step):
    try:
        return TensorBoardLog(os.path.join(output_dir, "tensorboard"), next_step)
    except ImportError:
        raise TrainingError(
            "--tensorboard needs tensorboard, an optional dependency: pip install tensorboard") from None


# ---------------------------------------------------------------------------------------------
# The options (docs/options.md has them in the same groups)
# ---------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description="Train GoogLeNet (Inception v1) on a folder of flower photos.",
                                formatter_class=options.HelpFormatter)
    inputs = p.add_argument_group('Data', 'what to train on, how it is split, read and sampled')
    inputs.add_argument("--data-path", default=DEFAULT_DATA,
                        help="folder of class folders (<class>/<images>), or with train/<class>/ and val/<class>/")
    inputs.add_argument("--val-ratio", type=options.open_fraction, default=0.1,
                        help="for a folder of class folders: the share of each class held out for validation")
    inputs.add_argument("--split-seed", type=options.seed, default=0,
                        help="for a folder of class folders: seed of that split (as split_data.py's --seed)")
    inputs.add_argument("--download", action="store_true",
                        help="if --data-path is missing, download the flower photos into it and split them 9:1")
    inputs.add_argument("--data-url", default=download.FLOWERS_URL,
                        help="mirror URL or local copy of flower_photos.tgz")
    inputs.add_argument("--data-sha256", default=download.FLOWERS_SHA256,
                        help="expected SHA-256 of the --data-url archive")
    inputs.add_argument("--cache", default="auto", choices=["auto", "on", "off"],
                        help="keep decoded images in memory (auto: when they fit in half the free memory)")
    inputs.add_argument("--bad-images", default="skip", choices=["skip", "error"],
                        help="unreadable image files: skip and list them, or stop with an error naming the first")
    inputs.add_argument("--review", default="on", choices=review.MODES,
                        help="DIR/review.csv, the decisions of python app.py --review: on leaves its excluded photos "
                             "out and trains its relabelled ones under their new class (train and val, after the "
                             "split); off ignores it")
    inputs.add_argument("--workers", type=options.non_negative_int, default=None,
                        help="data loader processes (default: min(cpu count, batch size, 8) on CUDA; on a CPU 0 with "
                             "the cache and 1 without, so loading does not fight the compute)")
    inputs.add_argument("--sampler", default="shuffle", choices=["shuffle", "balanced"],
                        help="the order of each epoch: every training image once (shuffle), or as many draws as "
                             "images with every class equally likely (balanced; seeded per epoch)")
    inputs.add_argument("--class-weights", default="none", choices=["none", "balanced"],
                        help="weigh each class's loss (aux heads too): balanced = by the inverse of its share of the "
                             "training images, so a small class counts as much as a large one")
    schedule = p.add_argument_group('Length, optimizer and schedule')
    schedule.add_argument("--epochs", type=options.positive_int, default=None,
                          help="passes over the training images (default 25; with --time-budget, the most it may plan)")
    schedule.add_argument("--time-budget", type=options.positive_float, default=None, metavar="MINUTES",
                          help="the whole run's minutes: the first epochs are timed, then as many epochs as fit are "
                               "planned (the schedules end with the budget) and the plan is printed")
    schedule.add_argument("--batch-size", type=options.positive_int, default=32, help="images per step in each process")
    schedule.add_argument("--micro-batch", type=options.non_negative_int, default=0,
                          help="split each step into chunks of this many images, accumulating gradients (same result "
                               "without BatchNorm, less memory; 0: the whole batch at once)")
    schedule.add_argument("--lr", type=options.positive_float, default=1e-3,
                          help="learning rate, applied as given in every process")
    schedule.add_argument("--opt", default="adamw", choices=["adam", "adamw", "sgd"], help="optimizer")
    schedule.add_argument("--momentum", type=options.below_one, default=0.9, help="SGD momentum")
    schedule.add_argument("--weight-decay", type=options.non_negative_float, default=0.05,
                          help="L2 penalty (decoupled for adamw)")
    schedule.add_argument("--lr-scheduler", default="cosine", choices=["none", "cosine", "step"],
                          help="learning-rate schedule over the epochs, stepped once per epoch")
    schedule.add_argument("--warmup-epochs", type=options.non_negative_int, default=3,
                          help="linear warm-up before the schedule")
    schedule.add_argument("--lr-step-size", type=options.positive_int, default=10,
                          help="epochs between decays of the step schedule")
    schedule.add_argument("--lr-gamma", type=options.positive_float, default=0.1,
                          help="decay factor of the step schedule")
    schedule.add_argument("--label-smoothing", type=options.below_one, default=0.1,
                          help="cross-entropy label smoothing")
    schedule.add_argument("--aux-weight", type=options.non_negative_float, default=0.3,
                          help="weight of each auxiliary classifier's loss")
    schedule.add_argument("--patience", type=options.non_negative_int, default=0,
                          help="end the run when --best-metric has not improved for this many epochs (0: never)")
    schedule.add_argument("--best-metric", default="accuracy", choices=list(BEST_METRICS),
                          help="the validation score that chooses best.pth (and that --patience watches)")
    network = p.add_argument_group('Network, sizes and augmentation')
    network.add_argument("--variant", default=None, choices=VARIANTS,
                         help="network layout: the paper's, or torchvision's with BatchNorm, which trains faster "
                              "from scratch (default: torchvision, or that of --weights)")
    network.add_argument("--image-size", type=options.size_schedule, default="128", metavar="SIZE or FIRST:LAST",
                         help="training crop size in pixels, or a schedule such as 96:160 that grows it linearly "
                              "over the epochs in steps of 32 (progressive resizing)")
    network.add_argument("--val-resize", type=options.image_size, default=None,
                         help="evaluation: resize images to this square size (default: --val-crop)")
    network.add_argument("--val-crop", type=options.image_size, default=None,
                         help="evaluation: then take the centre crop of this size (default: 1.25 x the last "
                              "--image-size, as random crops show objects larger than a whole image does; for "
                              "--eval-only, the size recorded in --weights)")
    network.add_argument("--auto-augment", default="trivialaugment", choices=["none", *data.AUTO_AUGMENT],
                         help="augmentation policy applied after the crop and flip")
    network.add_argument("--random-erase", type=options.probability, default=0.1,
                         help="probability of erasing a random rectangle of each training image")
    network.add_argument("--mixup-alpha", type=options.non_negative_float, default=0.0,
                         help="MixUp's Beta(alpha, alpha) (0: off)")
    network.add_argument("--cutmix-alpha", type=options.non_negative_float, default=0.0,
                         help="CutMix's Beta(alpha, alpha) (0: off; with MixUp on, each batch gets one of the two)")
    network.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                         help="keep an exponential moving average of the weights; validate and save it as best.pth")
    network.add_argument("--model-ema-decay", type=options.open_fraction, default=0.999,
                         help="EMA decay per step: the average spans about 1 / (1 - decay) steps")
    not_sure = p.add_argument_group("What is not a flower",
                                    "training the \"not sure\" answer (docs/trust.md); all off by default")
    not_sure.add_argument("--outliers", type=options.non_negative_int, default=0,
                          help="outlier exposure: generated images (noise, textures, shapes, shuffled and blended "
                               "photos) added to each step, whose answers are pushed towards uniform probabilities, "
                               "so that photos of none of the classes get low ones and are answered unknown (0: off)")
    not_sure.add_argument("--outlier-weight", type=options.non_negative_float, default=None,
                          help="weight of the outliers' loss (default: 0.5 for the uniform loss, 0.1 for the energy "
                               "margins, the weight Liu et al. used)")
    not_sure.add_argument("--outlier-loss", default="uniform", choices=["uniform", "energy"],
                          help="what --outliers trains: uniform (cross-entropy to the uniform distribution) or "
                               "energy (Liu et al. 2020: squared hinges that push the photos' energy, -log-sum-exp "
                               "of the logits, below M_IN and the outliers' above M_OUT of --energy-margins)")
    not_sure.add_argument("--energy-margins", type=options.finite_float, nargs=2, default=list(ENERGY_MARGINS),
                          metavar=("M_IN", "M_OUT"),
                          help="with --outlier-loss energy: the photos' energies are pushed below M_IN and the "
                               "outliers' above M_OUT (M_IN < M_OUT; the paper's -25 -7 were for fine-tuning, see "
                               "docs/trust.md)")
    not_sure.add_argument("--logit-norm", type=options.non_negative_float, default=0.0, metavar="TAU",
                          help="LogitNorm (Wei et al. 2022): every head's loss sees the logits scaled to the norm 1 "
                               "/ TAU, so that training cannot make the model surer by growing them (the paper: "
                               "0.04; 0: off)")
    not_sure.add_argument("--pixmix", type=options.non_negative_int, default=0, metavar="ROUNDS",
                          help="PixMix (Hendrycks et al. 2022) with generated pictures: each photo mixed, in 0 to "
                               "ROUNDS rounds (the paper: up to 4), with a fractal, noise, texture or shapes picture "
                               "and its own mirror image, additively or multiplicatively; its label kept (0: off)")
    not_sure.add_argument("--pixmix-beta", type=options.positive_float, default=3.0, metavar="BETA",
                          help="with --pixmix: the strength of the mixing weights' Beta distributions (the paper: 3; "
                               "larger keeps more of the photo)")
    not_sure.add_argument("--rotation-weight", type=options.non_negative_float, default=0.0,
                          help="a rotation head (a Linear on the pooled features) learns which quarter turn a copy "
                               "of --rotation-share of each batch was given, with this weight on its loss (0: off, "
                               "no head)")
    not_sure.add_argument("--rotation-share", type=options.share, default=0.25,
                          help="with --rotation-weight: the share of each batch copied and turned by 90, 180 or 270 "
                               "degrees, run beside it (1: a copy of every photo)")
    not_sure.add_argument("--not-sure-score", default=None, choices=calibration.SCORES,
                          help="the score whose threshold makes a photo \"not sure\" (unknown), stored in best.pth "
                               "and its .onnx export: max_probability (the top probability), energy (log-sum-exp of "
                               "the calibrated logits) or rotation (needs --rotation-weight; 4 passes a photo). "
                               "Default energy (the best measured: docs/trust.md); with --eval-only, the weights' own "
                               "(with --calibrate, the one to store)")
    where = p.add_argument_group('Where it runs')
    where.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    where.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                       help="mixed precision. auto: on CUDA bf16 where the GPU has it natively (Ampere and later), "
                            "else fp16 with loss scaling; on a CPU bf16 where it has native bf16 (avx512_bf16, "
                            "amx_bf16), else fp32. off: fp32")
    where.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                       help="NHWC memory format: faster convolutions on CPUs and tensor cores")
    where.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    saving = p.add_argument_group('Starting, resuming, saving')
    saving.add_argument("--weights", default=None,
                        help="start from these weights: a checkpoint, a state dict, or 'imagenet' for torchvision's "
                             "ImageNet GoogLeNet (downloaded with torch.hub)")
    saving.add_argument("--freeze-layers", action="store_true", help="train only the classifier heads")
    saving.add_argument("--eval-only", action="store_true",
                        help="only evaluate --weights on every image of --data-path's class folders (or of its val/ "
                             "folder), classes matched by name; in the folder the weights were trained on, on its "
                             "val images only")
    saving.add_argument("--unknowns", default=None, metavar="FOLDER",
                        help="with --eval-only: also score these photos of none of the classes (every image under "
                             "FOLDER) and report how well the top probability tells them from the test images: the "
                             "AUROC, and the shares caught and answered at the \"not sure\" threshold")
    saving.add_argument("--tta", action="store_true",
                        help="with --eval-only: average the logits of each image and its mirror image")
    saving.add_argument("--calibrate", action="store_true",
                        help="with --eval-only: fit the temperature and the \"not sure\" threshold on the images "
                             "scored (in fp32: it sets --amp off) and store them in --weights (training does this on "
                             "its val images)")
    saving.add_argument("--resume", default=None, help="continue the run saved in this last.pth")
    saving.add_argument("--save-every", type=options.non_negative_int, default=0,
                        help="also save last.pth every this many steps inside an epoch (0: at epoch ends only)")
    saving.add_argument("--output-dir", default="weights", help="where best.pth, last.pth and metrics.csv go")
    saving.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output-dir that holds one (replacing its best.pth and "
                             "last.pth) instead of refusing")
    saving.add_argument("--tensorboard", action="store_true",
                        help="also log the losses, accuracy, learning rate and speed to OUTPUT_DIR/tensorboard "
                             "(needs tensorboard)")
    saving.add_argument("--class-indices", default="class_indices.json",
                        help="also write the class index file here (it is always written into --output-dir)")
    saving.add_argument("--seed", type=options.seed, default=0,
                        help="seeds the weights, the shuffling and the augmentation")
    return p


def run(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_crop and args.val_resize and args.val_crop > args.val_resize:  # before minutes of loading
        parser.error(f"--val-crop {args.val_crop} is larger than --val-resize {args.val_resize}: "
                     "the crop is taken from the resized image")
    if args.calibrate:  # the temperature is fitted on fp32 logits, as training fits it when it ends
        if args.amp not in ("auto", "off"):
            parser.error(f"--calibrate fits the temperature on fp32 logits: leave out --amp {args.amp}")
        args.amp = "off"
    if args.outlier_weight is None:
        args.outlier_weight = OUTLIER_WEIGHTS[args.outlier_loss]
    if args.energy_margins[0] >= args.energy_margins[1]:
        parser.error("--energy-margins M_IN M_OUT: the photos' margin M_IN must lie below the outliers' M_OUT, got "
                     "{:g} {:g}".format(*args.energy_margins))
    if not args.eval_only:  # --eval-only's default: the score its weights record
        args.not_sure_score = args.not_sure_score or calibration.DEFAULT_SCORE
        if args.not_sure_score == "rotation" and not args.rotation_weight and not args.resume:
            parser.error("--not-sure-score rotation needs the rotation head: add --rotation-weight W (0.5, say)")
    with contextlib.ExitStack() as cleanup:
        given = options.given_options(parser, argv)
        return options.run_command(functools.partial(main, given=given, cleanup=cleanup), args)


if __name__ == "__main__":
    exit_code = run()
    if exit_code and "WORLD_SIZE" in os.environ:
        # a torchrun process that failed ends here, skipping the C++ teardown at exit, which once
        # in about ten runs of the failure test aborted with "terminate called without an active
        # exception" after the error line
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
