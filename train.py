"""Train GoogLeNet on an ImageFolder tree of flower photos.

    python train.py                                    # data_set/flower_data/{train,val}
    torchrun --nproc_per_node=2 train.py ...           # data-parallel, one process per GPU
    python train.py --resume weights/last.pth          # continue an interrupted run
"""
import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import checkpoint as ckpt
import data
import device as dev
import options
from model import HEAD_PREFIXES, VARIANTS, GoogLeNet, logits_with_mirror
from report import (TensorBoardLog, append_metrics, print_evaluation, write_confusion_csv,
                    write_predictions_csv)

IMAGENET_URL = "https://download.pytorch.org/models/googlenet-1378be20.pth"
DEFAULT_DATA = os.path.join("data_set", "flower_data")
# The default recipe (see README's results): the torchvision layout, AdamW with a cosine schedule,
# TrivialAugment, random erasing, label smoothing and an EMA of the weights, at 128 px.
DEFAULT_VARIANT = "torchvision"
LAYOUTS = "a folder of class folders (DIR/<class>/<images>) or of a split (DIR/train/<class>/, DIR/val/<class>/)"


class TrainingError(Exception):
    """A run that cannot go on (the loss diverged, a save failed): the message says what to do."""


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked after every step, so a stop never tears a step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signum

    def check(self, device, diverged=False):
        """(diverged anywhere, stop requested anywhere): every process acts at the same step."""
        flags = dev.all_reduce_sum([float(diverged), float(self.signal is not None)], device)
        return flags[0] > 0, flags[1] > 0


def get_args_parser():
    p = argparse.ArgumentParser(description="Train GoogLeNet (Inception v1) on a folder of flower photos.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", default=DEFAULT_DATA,
                   help="folder of class folders (<class>/<images>), or with train/<class>/ and val/<class>/")
    p.add_argument("--val-ratio", type=options.open_fraction, default=0.1,
                   help="for a folder of class folders: the share of each class held out for validation")
    p.add_argument("--split-seed", type=options.seed, default=0,
                   help="for a folder of class folders: seed of that split (as split_data.py's --seed)")
    p.add_argument("--download", action="store_true",
                   help="if --data-path is missing, download the flower photos into it and split them 9:1")
    p.add_argument("--data-url", default=data.FLOWERS_URL, help="mirror URL or local copy of flower_photos.tgz")
    p.add_argument("--data-sha256", default=data.FLOWERS_SHA256, help="expected SHA-256 of the --data-url archive")
    p.add_argument("--epochs", type=options.positive_int, default=25, help="passes over the training images")
    p.add_argument("--batch-size", type=options.positive_int, default=32, help="images per step in each process")
    p.add_argument("--micro-batch", type=options.non_negative_int, default=0,
                   help="split each step into chunks of this many images, accumulating gradients "
                        "(same result without BatchNorm, less memory; 0: the whole batch at once)")
    p.add_argument("--lr", type=options.positive_float, default=1e-3, help="learning rate, applied as given in every process")
    p.add_argument("--opt", default="adamw", choices=["adam", "adamw", "sgd"], help="optimizer")
    p.add_argument("--momentum", type=options.below_one, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=options.non_negative_float, default=0.05, help="L2 penalty (decoupled for adamw)")
    p.add_argument("--lr-scheduler", default="cosine", choices=["none", "cosine", "step"],
                   help="learning-rate schedule over the epochs, stepped once per epoch")
    p.add_argument("--warmup-epochs", type=options.non_negative_int, default=3, help="linear warm-up before the schedule")
    p.add_argument("--lr-step-size", type=options.positive_int, default=10, help="epochs between decays of the step schedule")
    p.add_argument("--lr-gamma", type=options.positive_float, default=0.1, help="decay factor of the step schedule")
    p.add_argument("--label-smoothing", type=options.below_one, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--aux-weight", type=options.non_negative_float, default=0.3, help="weight of each auxiliary classifier's loss")
    p.add_argument("--variant", default=None, choices=VARIANTS,
                   help="network layout: the paper's, or torchvision's with BatchNorm, which trains "
                        "faster from scratch (default: torchvision, or that of --weights)")
    p.add_argument("--image-size", type=options.image_size, default=128, help="training crop size in pixels")
    p.add_argument("--val-resize", type=options.image_size, default=None,
                   help="evaluation: resize images to this square size (default: --val-crop)")
    p.add_argument("--val-crop", type=options.image_size, default=None,
                   help="evaluation: then take the centre crop of this size (default: 1.25 x --image-size, "
                        "as random crops show objects larger than a whole image does; for --eval-only, "
                        "the size recorded in --weights)")
    p.add_argument("--auto-augment", default="trivialaugment", choices=["none", *data.AUTO_AUGMENT],
                   help="augmentation policy applied after the crop and flip")
    p.add_argument("--random-erase", type=options.probability, default=0.1,
                   help="probability of erasing a random rectangle of each training image")
    p.add_argument("--mixup-alpha", type=options.non_negative_float, default=0.0, help="MixUp's Beta(alpha, alpha) (0: off)")
    p.add_argument("--cutmix-alpha", type=options.non_negative_float, default=0.0,
                   help="CutMix's Beta(alpha, alpha) (0: off; with MixUp on, each batch gets one of the two)")
    p.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an exponential moving average of the weights; validate and save it as best.pth")
    p.add_argument("--model-ema-decay", type=options.open_fraction, default=0.999,
                   help="EMA decay per step: the average spans about 1 / (1 - decay) steps")
    p.add_argument("--workers", type=options.non_negative_int, default=None,
                   help="data loader processes (default: min(cpu count, batch size, 8) on CUDA; "
                        "on a CPU 0 with the cache and 1 without, so loading does not fight the compute)")
    p.add_argument("--cache", default="auto", choices=["auto", "on", "off"],
                   help="keep decoded images in memory (auto: when they fit in half the free memory)")
    p.add_argument("--bad-images", default="skip", choices=["skip", "error"],
                   help="unreadable image files: skip and list them, or stop with an error naming the first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision. auto: on CUDA bf16 where supported, else fp16; on a CPU bf16 "
                        "where it has native bf16 (avx512_bf16, amx_bf16), else fp32. off: fp32")
    p.add_argument("--channels-last", default="on", choices=["on", "off"],
                   help="NHWC memory format: faster convolutions on CPUs and tensor cores")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    p.add_argument("--weights", default=None,
                   help="start from these weights: a checkpoint, a state dict, or 'imagenet' for "
                        "torchvision's ImageNet GoogLeNet (downloaded with torch.hub)")
    p.add_argument("--freeze-layers", action="store_true", help="train only the classifier heads")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --weights on the val folder")
    p.add_argument("--tta", action="store_true",
                   help="with --eval-only: average the logits of each image and its mirror image")
    p.add_argument("--resume", default=None, help="continue the run saved in this last.pth")
    p.add_argument("--save-every", type=options.non_negative_int, default=0,
                   help="also save last.pth every this many steps inside an epoch (0: at epoch ends only)")
    p.add_argument("--output-dir", default="weights", help="where best.pth, last.pth and metrics.csv go")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the losses, accuracy, learning rate and speed to OUTPUT_DIR/tensorboard "
                        "(needs tensorboard)")
    p.add_argument("--class-indices", default="class_indices.json",
                   help="also write the class index file here (it is always written into --output-dir)")
    p.add_argument("--seed", type=options.seed, default=0, help="seeds the weights, the shuffling and the augmentation")
    return p


def build_optimizer(args, params):
    # fused: the whole update of every parameter in one kernel (CPU, CUDA and MPS); on this
    # project's 2-core CPU an Adam step takes 8 ms instead of 33 ms with foreach=True
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, fused=True)
    opt_class = torch.optim.AdamW if args.opt == "adamw" else torch.optim.Adam
    return opt_class(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def build_scheduler(args, optimizer):
    """LR factor per epoch: linear warm-up, then constant, cosine to zero, or step decay."""
    def factor(epoch):
        if epoch < args.warmup_epochs:
            return (epoch + 1) / (args.warmup_epochs + 1)
        e = epoch - args.warmup_epochs
        if args.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * e / max(1, args.epochs - args.warmup_epochs)))
        if args.lr_scheduler == "step":
            return args.lr_gamma ** (e // args.lr_step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, criterion, optimizer, scaler, loader, device, epoch, args, state, stop, save_last,
                    mix=None, ema=None):
    """One pass over loader; returns (mean loss, accuracy, images/s) or None when a stop was requested.

    The accuracy is None with MixUp/CutMix: the targets are then mixtures, not classes.
    """
    model.train()
    if args.freeze_layers:  # frozen layers keep their BatchNorm statistics too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()
    loss_sum, seen = state.get("epoch_loss_sum", 0.0), state.get("epoch_seen", 0)
    correct = state.get("epoch_correct", 0)
    step = state.get("step", 0)
    micro = args.micro_batch if 0 < args.micro_batch < args.batch_size else args.batch_size
    bar = tqdm(loader, desc=f"train {epoch + 1}/{args.epochs}", disable=not state["is_main"],
               initial=step, total=step + len(loader), file=sys.stdout, dynamic_ncols=True)
    start, images_timed = time.perf_counter(), 0
    for images, targets in bar:
        images = data.normalize_batch(images.to(device, non_blocking=True), state["mean"], state["std"],
                                      channels_last=state["channels_last"])
        targets = targets.to(device, non_blocking=True)
        labels = targets
        if mix is not None:
            images, targets = mix(images, targets)  # soft targets, for the aux heads too
        optimizer.zero_grad(set_to_none=True)
        chunks = list(zip(images.split(micro), targets.split(micro), labels.split(micro)))
        step_loss = 0.0
        for i, (x, y, hard) in enumerate(chunks):
            # DDP all-reduces gradients only on the last chunk of a step
            last_chunk = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last_chunk or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with dev.autocast(device, state["amp_dtype"]):
                    logits, aux2, aux1 = model(x)
                logits, aux2, aux1 = logits.float(), aux2.float(), aux1.float()
                loss = criterion(logits, y) + args.aux_weight * (criterion(aux1, y) + criterion(aux2, y))
                loss = loss * (len(x) / len(images))  # chunks add up to the mean over the batch
                scaler.scale(loss).backward()
            step_loss += loss.item()
            if mix is None:
                correct += (logits.argmax(1) == hard).sum().item()
        # one all-reduce per step tells every process about a diverged loss or a stop request
        diverged, stopping = stop.check(device, not math.isfinite(step_loss))
        if diverged:
            raise TrainingError(f"the loss became {step_loss if not math.isfinite(step_loss) else 'nan or inf in another process'} "
                                f"at epoch {epoch + 1}, step {step + 1}: training diverged; lower --lr "
                                "(best.pth was not touched)")
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model.module if hasattr(model, "module") else model)
        step += 1
        if state.get("tensorboard"):
            state["tensorboard"].add({"train/step_loss": step_loss}, epoch * state["steps_per_epoch"] + step)
        loss_sum += step_loss * len(images)
        seen += len(images)
        images_timed += len(images)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        state.update(step=step, epoch_loss_sum=loss_sum, epoch_seen=seen, epoch_correct=correct)
        if stopping:
            bar.close()
            return None
        if args.save_every and step % args.save_every == 0:
            save_last(epoch)
    bar.close()
    elapsed = time.perf_counter() - start
    totals = dev.all_reduce_sum([loss_sum, seen, images_timed, correct], device)
    accuracy = totals[3] / max(totals[1], 1) if mix is None else None
    return totals[0] / max(totals[1], 1), accuracy, totals[2] / max(elapsed, 1e-9)


@torch.inference_mode()
def evaluate(model, criterion, loader, device, num_classes, state, desc="val", tta=False, per_image=False):
    """Loss, accuracy and the confusion matrix (rows: true class, columns: predicted) over every image;
    with per_image, also [(dataset index, class probabilities, cross-entropy)] for every image, in order."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum, rows = 0.0, []
    indices = iter(loader.sampler)  # an evaluation sampler hands out plain indices, in loading order
    for images, targets in tqdm(loader, desc=desc, disable=not state["is_main"], file=sys.stdout,
                                dynamic_ncols=True, leave=False):
        images = data.normalize_batch(images.to(device, non_blocking=True), state["mean"], state["std"],
                                      channels_last=state["channels_last"])
        targets = targets.to(device, non_blocking=True)
        with dev.autocast(device, state["amp_dtype"]):
            logits = logits_with_mirror(model, images) if tta else model(images)
        loss_sum += criterion(logits.float(), targets).item() * len(images)
        predictions = logits.argmax(dim=1)
        confusion += torch.bincount(targets * num_classes + predictions,
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
        if per_image:
            log_p = torch.log_softmax(logits.float(), dim=1)
            losses = -log_p.gather(1, targets[:, None])[:, 0]
            rows += [(next(indices), p, l) for p, l in zip(log_p.exp().tolist(), losses.tolist())]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
        if per_image:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = sorted(r for part in gathered for r in part)
    total_loss = dev.all_reduce_sum([loss_sum], device)[0]
    confusion = confusion.cpu()
    count = int(confusion.sum())
    accuracy = confusion.diag().sum().item() / max(count, 1)
    if per_image:
        return total_loss / max(count, 1), accuracy, confusion, rows
    return total_loss / max(count, 1), accuracy, confusion


def sync_ranks(model, ema=None):
    """Distributed runs, after each epoch's training: every process must hold rank 0's model.

    DDP keeps the parameters identical (same start, same all-reduced gradients), and this checks
    it: each process compares its parameters with rank 0's (one broadcast of the weights, ~50 MB
    for GoogLeNet, once per epoch) and every process raises TrainingError if any differs. The
    BatchNorm running statistics are different by design: DDP broadcasts them at the start of each
    training forward, so after the last step each process holds those of its own last batch. They
    are copied from rank 0 here (and those averaged into the EMA), so validation runs the model
    that rank 0 saves, on every process.
    """
    mine = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    diff = (mine - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # every process learns the verdict: none hangs
    for buffer in list(model.buffers()) + (list(ema.buffers()) if ema is not None else []):
        dist.broadcast(buffer, src=0)
    if diff.item() != 0:
        raise TrainingError(f"the processes' weights diverged (largest difference from rank 0: "
                            f"{diff.item():.3g}): the distributed run is broken; rerun with one process")


def find_data(args, is_main, log, recorded_split=None):
    """The classes and the (path, class index) samples to train and validate on.

    Two layouts: DATA/train/<class>/ with DATA/val/<class>/, a split made beforehand (by
    data_set/split_data.py, say), used as it is; or DATA/<class>/, a plain folder of class folders,
    of which train.py holds out --val-ratio of each class with split_data.py's rule (the same
    split). The held-out split is returned as a record for the checkpoint (None for the first
    layout), and a recorded split (resume, --eval-only) is used again as it was.
    """
    root = args.data_path
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if args.download and not os.path.isdir(train_dir) and is_main:
        from data_set.split_data import split_dataset

        photos = data.download_flowers(root, url=args.data_url, sha256=args.data_sha256, log=log)
        split_dataset(photos, root, val_ratio=0.1, seed=0, force=True, log=log)  # train/ is missing
    if args.download and dist.is_available() and dist.is_initialized():
        dist.barrier()  # the other processes wait for rank 0's download
    if not os.path.isdir(root):
        hint = ("run `python train.py --download` to fetch and split the flower photos"
                if os.path.normpath(root) == os.path.normpath(DEFAULT_DATA) else
                f"pass --data-path with {LAYOUTS}")
        raise data.DataError(f"data folder {root} does not exist: {hint}")

    if os.path.isdir(train_dir) or os.path.isdir(val_dir):
        for folder in ([] if args.eval_only else [train_dir]) + [val_dir]:
            if not os.path.isdir(folder):
                raise data.DataError(f"data folder {folder} does not exist: a split needs both "
                                     f"{os.path.join(root, 'train')} and {os.path.join(root, 'val')}")
        classes = data.find_classes(val_dir if args.eval_only else train_dir)
        train = [] if args.eval_only else data.list_images(train_dir, classes)
        return classes, train, data.list_images(val_dir, classes), None

    folders = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    if not folders:
        files = sum(1 for e in os.scandir(root) if e.is_file())
        raise data.DataError(f"{root} holds {files} file(s) and no folders: pass --data-path with {LAYOUTS}")
    classes = sorted(folders)
    samples = data.list_images(root, classes)
    if recorded_split is not None:
        val = [(os.path.join(root, *f.split("/")), classes.index(f.split("/")[0]))
               for f in recorded_split["val_files"] if f.split("/")[0] in classes]
        missing = [p for p, _ in val if not os.path.isfile(p)]
        if missing or len(val) != len(recorded_split["val_files"]):
            raise data.DataError(f"{root} no longer holds the run's val images ({(missing or ['a class'])[0]} "
                                 "is missing): use the folder the run was trained on")
        held_out = {p for p, _ in val}
        train = [s for s in samples if s[0] not in held_out]
        split = recorded_split
    else:
        train, val = data.split_samples(samples, classes, args.val_ratio, args.split_seed)
        split = {"val_ratio": args.val_ratio, "seed": args.split_seed,
                 "val_files": [os.path.relpath(p, root).replace(os.sep, "/") for p, _ in val]}
    log(f"split: {root} is a folder of class folders; held out for val (ratio {split['val_ratio']}, "
        f"seed {split['seed']}): " + ", ".join(f"{c} {sum(k == i for _, k in train)}/{sum(k == i for _, k in val)}"
                                               for i, c in enumerate(classes)) + " (train/val)")
    return classes, ([] if args.eval_only else train), val, split


def read_start_weights(args):
    """--weights as (checkpoint dict, source): a checkpoint, a state dict or torchvision's ImageNet file."""
    if args.weights != "imagenet":
        return ckpt.load_checkpoint(args.weights), args.weights
    try:
        state_dict = torch.hub.load_state_dict_from_url(IMAGENET_URL, map_location="cpu", progress=True,
                                                        check_hash=True, weights_only=True)
    except Exception as e:
        raise ckpt.CheckpointError(f"cannot download the ImageNet weights ({str(e)[:120]}): check the "
                                   f"network, or download {IMAGENET_URL} and pass --weights FILE")
    return {"model": state_dict, "variant": "torchvision"}, IMAGENET_URL


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        ckpt.atomic_write_text(os.path.join(folder, ".write-test"), "ok")
        os.remove(os.path.join(folder, ".write-test"))
    except OSError as e:
        raise TrainingError(f"cannot write to output folder {folder} ({e.strerror or e}): "
                            "pass --output-dir with a writable folder, or free some disk space")


def image_sizes(args, start=None):
    """(training crop, evaluation resize, evaluation crop); --eval-only defaults to the sizes its weights record."""
    recorded = start if args.eval_only and start is not None else {}
    crop = args.val_crop or recorded.get("val_crop") or recorded.get("image_size") or args.image_size * 5 // 4
    resize = args.val_resize or (recorded.get("val_resize") if not args.val_crop else None) or crop
    return args.image_size, resize, crop


def build_datasets(args, classes, train_samples, val_samples, sizes, device, rank, world_size, log):
    """(train loader or None, val loader, worker count); the images are decoded here, once."""
    image_size, val_resize, val_crop = sizes
    cached = data.decide_cache(args.cache, [p for p, _ in train_samples + val_samples], log=log)
    workers = args.workers if args.workers is not None else data.default_workers(args.batch_size, device, cached)
    loaders = []
    for train, samples in ((True, train_samples), (False, val_samples)):
        if train and args.eval_only:
            loaders.append(None)
            continue
        transform = (data.build_transforms(True, image_size, None if args.auto_augment == "none" else args.auto_augment,
                                           args.random_erase) if train else
                     data.build_transforms(False, image_size, val_resize=val_resize, val_crop=val_crop))
        dataset = data.FlowerFolder(args.data_path, transform, classes, cached, args.bad_images, samples=samples)
        sampler = (data.EpochSampler(len(dataset), True, args.seed, rank, world_size) if train else
                   data.EpochSampler(len(dataset), False, 0, rank, world_size, pad=False))
        loaders.append(data.make_loader(dataset, sampler, args.batch_size, workers, device))
        if dataset.skipped:
            log(f"skipped {len(dataset.skipped)} unreadable image(s): "
                + "; ".join(f"{p} ({e})" for p, e in dataset.skipped))
    return loaders[0], loaders[1], workers


def build_model(args, classes, resume, start, source, device, log):
    """GoogLeNet with aux heads, of the variant asked for or recorded, with --weights loaded."""
    recorded = resume or start
    variant = args.variant or DEFAULT_VARIANT
    if recorded is not None:
        variant = recorded.get("variant") or ckpt.guess_variant(ckpt.clean_state_dict(recorded["model"]))
        if args.variant and args.variant != variant:
            raise ckpt.CheckpointError(f"--variant {args.variant}, but {args.resume or args.weights} holds the "
                                       f"{variant} variant: leave out --variant")
    model = GoogLeNet(num_classes=len(classes), aux_logits=True, init_weights=True, variant=variant)
    if start is not None:
        # fine-tuning replaces heads sized for other classes; evaluation uses the weights as they are
        reset = ckpt.load_weights(model, start["model"], source, reinit_heads=not args.eval_only)
        log(f"weights: loaded {source}" + (f"; re-initialised for {len(classes)} classes: {', '.join(reset)}"
                                          if reset else ""))
    if args.freeze_layers:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(HEAD_PREFIXES + ("aux1.", "aux2."))
    model.to(device)
    if args.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    return model, variant


def evaluate_only(args, model, criterion, val_loader, device, classes, start, state):
    trained_on = start.get("classes")
    if trained_on and trained_on != classes:
        raise ckpt.CheckpointError(f"{args.weights} was trained on classes {trained_on}, the val folder "
                                   f"has {classes}: evaluate on data with the same class folders")
    loss, _, confusion, rows = evaluate(model, criterion, val_loader, device, len(classes), state, tta=args.tta,
                                        per_image=True)
    if state["is_main"]:
        print_evaluation(classes, confusion, loss)
        path = os.path.join(args.output_dir, "confusion_matrix.csv")
        write_confusion_csv(path, classes, confusion)
        samples = val_loader.dataset.samples
        write_predictions_csv(os.path.join(args.output_dir, "predictions.csv"), classes,
                              [(samples[i][0], samples[i][1], p, l) for i, p, l in rows])
        print(f"confusion matrix and per-image predictions written to {path} and "
              f"{os.path.join(args.output_dir, 'predictions.csv')}")
    return 0


def build_ema(args, model):
    """The weights' exponential moving average (torch.optim.swa_utils), or None without --model-ema.

    Its decay grows as (1 + n) / (10 + n) after n updates up to --model-ema-decay, as TensorFlow's
    ExponentialMovingAverage does with num_updates: a fixed 0.999 would still hold 60% of the
    random initial weights after 500 steps (6 epochs of the flower photos).
    """
    if not args.model_ema:
        return None
    swa = torch.optim.swa_utils

    def ema_update(averaged, current, num_averaged):
        n = int(num_averaged)
        swa.get_ema_multi_avg_fn(min(args.model_ema_decay, (1 + n) / (10 + n)))(averaged, current, num_averaged)

    return swa.AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


def main(args):
    rank, world_size, local_rank = dev.init_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    device = dev.pick_device(args.device, local_rank)
    dev.tune_backends(device)
    amp_dtype = dev.amp_dtype(device, args.amp)
    precision, warning = dev.describe_precision(device, amp_dtype)
    if warning:
        log(warning)
    resume = ckpt.load_checkpoint(args.resume, "--resume") if args.resume else None
    if resume is not None and "optimizer" not in resume:
        raise ckpt.CheckpointError(f"{args.resume} holds weights only, not a run to resume: "
                                   "pass the last.pth of the run, or use --weights to start from it")
    if args.eval_only and not args.weights:
        raise TrainingError("--eval-only needs --weights PATH: the weights to evaluate")
    torch.manual_seed(args.seed)
    # the weights before the images: a wrong path fails before minutes of decoding
    start, source = read_start_weights(args) if args.weights and resume is None else (None, None)

    recorded_split = (resume or start or {}).get("split")
    classes, train_samples, val_samples, split = find_data(args, is_main, log, recorded_split)
    if not args.eval_only and len(classes) < 2:
        raise data.DataError(f"{args.data_path} has one class folder ({classes[0]}): a classifier needs two or "
                             f"more; if {classes[0]} holds the class folders, pass --data-path "
                             f"{os.path.join(args.data_path, classes[0])}")
    if is_main:
        check_writable(args.output_dir)
        ckpt.remove_stale_temp_files(args.output_dir)
    if resume is not None and resume.get("classes") != classes:
        raise ckpt.CheckpointError(f"{args.resume} was trained on classes {resume.get('classes')}, "
                                   f"the data has {classes}: resume with the same --data-path")
    sizes = image_sizes(args, start)
    train_loader, val_loader, workers = build_datasets(args, classes, train_samples, val_samples, sizes,
                                                       device, rank, world_size, log)
    log(f"data: {len(classes)} classes {classes}; "
        + ("" if args.eval_only else f"{len(train_loader.dataset)} train, ") + f"{len(val_loader.dataset)} val images "
        + ("(" if args.eval_only else f"({sizes[0]} px training crops, ") + f"evaluation at {sizes[2]} px); "
        f"device {device}, {precision}; {workers} loader workers; {world_size} process(es)")

    model, variant = build_model(args, classes, resume, start, source, device, log)
    state = {"is_main": is_main, "mean": data.MEAN, "std": data.STD, "amp_dtype": amp_dtype,
             "channels_last": args.channels_last == "on"}
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    run_model = torch.compile(model) if args.compile else model
    if args.eval_only:
        return evaluate_only(args, run_model, criterion, val_loader, device, classes, start, state)

    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        run_model = nn.parallel.DistributedDataParallel(run_model, device_ids=ids)
    optimizer = build_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scheduler = build_scheduler(args, optimizer)
    scaler = dev.grad_scaler(device, amp_dtype)
    ema = build_ema(args, model)
    mix = data.build_batch_mix(args.mixup_alpha, args.cutmix_alpha, len(classes))

    start_epoch, best_acc, best_epoch = 0, 0.0, 0
    if resume is not None:
        ckpt.load_weights(model, resume["model"], args.resume)
        if ema is not None:
            if "model_ema" not in resume:
                raise ckpt.CheckpointError(f"{args.resume} was saved without --model-ema: resume without it")
            ema.load_state_dict(resume["model_ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch, best_acc, best_epoch = resume["epoch"], resume["best_acc"], resume["best_epoch"]
        state.update(step=resume["step"], epoch_loss_sum=resume["epoch_loss_sum"], epoch_seen=resume["epoch_seen"],
                     epoch_correct=resume.get("epoch_correct", 0))
        ckpt.restore_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
        log(f"resuming {args.resume}: epoch {start_epoch + 1}, step {state['step']}, best accuracy {best_acc:.3f}")

    best_path = os.path.join(args.output_dir, "best.pth")
    last_path = os.path.join(args.output_dir, "last.pth")
    if is_main:
        ckpt.write_class_indices(os.path.join(args.output_dir, "class_indices.json"), classes)
        if args.class_indices:
            try:
                ckpt.write_class_indices(args.class_indices, classes)
            except OSError as e:
                raise TrainingError(f"cannot write the class index file {args.class_indices} "
                                    f"({e.strerror or e}): pass --class-indices with a writable path")
    eval_model = ema.module if ema is not None else model  # validated, and saved as best.pth

    def describe(weights):
        return {"model": weights.state_dict(), "classes": classes, "variant": variant,
                "image_size": sizes[0], "val_resize": sizes[1], "val_crop": sizes[2],
                "mean": list(data.MEAN), "std": list(data.STD), "split": split, "args": vars(args)}

    def save_last(epoch, completed=False):
        """last.pth: everything needed to continue; every process's RNG state is gathered."""
        rng = ckpt.capture_rng_state()
        rngs = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if not is_main:
            return
        payload = describe(model)
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       scaler=scaler.state_dict(), epoch=epoch + 1 if completed else epoch,
                       step=0 if completed else state["step"],
                       epoch_loss_sum=0.0 if completed else state["epoch_loss_sum"],
                       epoch_seen=0 if completed else state["epoch_seen"],
                       epoch_correct=0 if completed else state["epoch_correct"],
                       best_acc=best_acc, best_epoch=best_epoch, rng=rngs)
        if ema is not None:
            payload["model_ema"] = ema.state_dict()
        try:
            ckpt.save_checkpoint(payload, last_path)
        except OSError as e:
            raise TrainingError(f"cannot save {last_path} ({e.strerror or e}); the previous file is intact: "
                                "free some disk space and resume from it")

    stop = StopRequest()
    synced = False
    train_sampler = train_loader.sampler
    state["steps_per_epoch"] = math.ceil(train_sampler.epoch_length / args.batch_size)
    if args.tensorboard:
        try:
            next_step = start_epoch * state["steps_per_epoch"] + state.get("step", 0) + 1
            tensorboard = TensorBoardLog(os.path.join(args.output_dir, "tensorboard"), next_step) if is_main else None
        except ImportError:
            raise TrainingError("--tensorboard needs tensorboard, an optional dependency: pip install tensorboard")
        state["tensorboard"] = tensorboard
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch, start=state.get("step", 0) * args.batch_size)
        epoch_start = time.perf_counter()
        result = train_one_epoch(run_model, criterion, optimizer, scaler, train_loader, device, epoch,
                                 args, state, stop, save_last, mix, ema)
        if result is None:
            save_last(epoch)
            if state.get("tensorboard"):
                state["tensorboard"].close()
            signum = stop.signal or signal.SIGTERM  # another process may have caught it
            name = signal.Signals(signum).name
            log(f"\n{name}: stopped at epoch {epoch + 1}, step {state['step']}; saved {last_path}. "
                f"Resume with:\n  python train.py {resume_command(args, last_path)}")
            return 128 + signum
        train_loss, train_acc, images_per_s = result
        if world_size > 1:
            sync_ranks(model, ema)
            synced = True
        val_loss, val_acc, _ = evaluate(eval_model, criterion, val_loader, device, len(classes), state)
        if not math.isfinite(val_loss):  # the last step's update broke the weights: never save them
            raise TrainingError(f"the validation loss became {val_loss} after epoch {epoch + 1}: training "
                                "diverged; lower --lr (best.pth was not touched)")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state.update(step=0, epoch_loss_sum=0.0, epoch_seen=0, epoch_correct=0)
        seconds = time.perf_counter() - epoch_start
        improved = val_acc > best_acc or best_epoch == 0  # the first epoch always writes best.pth
        if improved:
            best_acc, best_epoch = val_acc, epoch + 1
        if is_main:
            log(f"[epoch {epoch + 1}] train_loss: {train_loss:.3f}  "
                + (f"train_accuracy: {train_acc:.3f}  " if train_acc is not None else "")
                + f"val_loss: {val_loss:.3f}  val_accuracy: {val_acc:.3f}  {images_per_s:.1f} img/s  {seconds:.0f} s")
            append_metrics(os.path.join(args.output_dir, "metrics.csv"), epoch + 1,
                           dict(lr=lr, train_loss=train_loss, train_accuracy="" if train_acc is None else train_acc,
                                val_loss=val_loss, val_accuracy=val_acc, images_per_s=images_per_s,
                                seconds=seconds))
            if state.get("tensorboard"):
                state["tensorboard"].add({"epoch": epoch + 1, "lr": lr, "train/loss": train_loss,
                                          "train/accuracy": train_acc, "val/loss": val_loss, "val/accuracy": val_acc,
                                          "images_per_s": images_per_s}, (epoch + 1) * state["steps_per_epoch"])
                state["tensorboard"].flush()
            if improved:
                payload = describe(eval_model)
                payload.update(epoch=epoch + 1, val_accuracy=val_acc)
                try:
                    ckpt.save_checkpoint(payload, best_path)
                except OSError as e:
                    raise TrainingError(f"cannot save {best_path} ({e.strerror or e}); the previous file is "
                                        "intact: free some disk space and resume from last.pth")
        save_last(epoch, completed=True)
    if state.get("tensorboard"):
        state["tensorboard"].close()
    if synced:
        log(f"ranks in sync: the {world_size} processes held identical weights after every epoch")
    log(f"best val_accuracy {best_acc:.3f} at epoch {best_epoch}, saved in {best_path}; "
        f"peak memory {peak_rss_gib():.1f} GiB")
    return 0


def peak_rss_gib():
    """Peak resident memory of this process, which holds the model and the image cache (0 where unknown).

    Not its children's: loader workers are forks that share its pages, and the children's figure
    also holds a fork that importing torch makes (to run ldconfig), which alone reports 0.4 GiB.
    """
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2 ** 20 if sys.platform != "darwin" else kib / 2 ** 30  # macOS counts bytes


def resume_command(args, last_path):
    parts = [f"--resume {shlex.quote(last_path)}"]  # quoted: paths may hold spaces
    defaults = get_args_parser().parse_args([])
    for key, value in vars(args).items():
        if key in ("resume", "download", "data_url", "data_sha256") or value == getattr(defaults, key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])  # flags that default to on have a --no- form
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def run(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.val_crop and args.val_resize and args.val_crop > args.val_resize:
        parser.error(f"--val-crop {args.val_crop} is larger than --val-resize {args.val_resize}: "
                     "the crop is taken from the resized image")
    try:
        code = main(args)
    except (data.DataError, ckpt.CheckpointError, dev.DeviceError, TrainingError, ckpt.SaveError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, (TrainingError, ckpt.SaveError)) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(run())
