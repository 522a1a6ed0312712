"""Suspect labels: the training photos ranked by how unlikely their given label is.

When training ends, the model the run ends with (the EMA of the weights, as validated and saved in
best.pth, or the weights themselves with --no-model-ema) scores every training photo the way it
scores the val photos: the evaluation preprocessing, no augmentation, the network in eval mode.
A photo's score is 1 - p(given class). These probabilities are in-sample (the network trained on
these photos); out-of-sample ones (cleanlab's K folds) would cost K trainings. The augmentation,
the label smoothing and the EMA keep the network from learning most wrong labels, and the last
model knows the pictures best, so it finds them best.

Measured on the flower photos with 5% of each class moved to a wrong class folder (127 of the
moved photos in train), after the default 25 epochs, as moved photos among the first 127 rows: 85
with this score; 86 with p(given) divided by its class's mean (confident learning's per-class
threshold), 85 with the mean of each photo and its mirror, 86 with the weights instead of
their EMA, 79 with the margin to the most likely other class, 78 with the photos that confident
learning flags ranked first. The EMA of earlier epochs finds fewer (epoch 4: 60, 8: 68, 12: 77,
16: 78; the mean of their probabilities: 77).

The pass reads the pixels the training cache holds (decoded in the first epoch): a validation
pass over the training photos (11 s for the 2,647 above on two CPU cores in bf16, about half an
epoch of that run).
"""
import csv
import io
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from plumbing import device as dev
from plumbing import distributed
from plumbing.atomic import atomic_write_text
from training import data

SUSPECT_FIELDS = ["file", "given_class", "suggested_class", "score"]


@torch.inference_mode()
def training_probabilities(model, loaders, run):
    """(dataset indices, class probabilities N x classes) of every readable training photo, with the
    evaluation preprocessing, on every process (each scores its share of the photos)."""
    train = loaders.train.dataset
    # the training cache's pixels under the evaluation transform: no photo is decoded again
    dataset = data.ImageDataset(train.samples, data.EvalTransform(run.record.preprocessing), train.cache,
                                substitute=False, writer=train.writer)
    sampler = data.EpochSampler(len(dataset), False, 0, run.rank, run.world_size, pad=False)
    loader = data.make_loader(dataset, sampler, run.args.batch_size, loaders.workers, run.device)
    model.eval()
    indices, rows = iter(sampler), []  # the sampler hands out plain indices, in loading order
    for images, _, valid in tqdm(loader, desc="scoring the training labels", disable=not run.is_main,
                                 file=sys.stdout, dynamic_ncols=True, leave=False):
        images = data.normalize_batch(images.to(run.device, non_blocking=True), run.record.preprocessing.mean,
                                      run.record.preprocessing.std, channels_last=run.args.channels_last)
        with dev.autocast(run.device, run.placement.amp_dtype):
            probabilities = torch.softmax(model(images).float(), dim=1).tolist()
        kept = [next(indices) for _ in range(len(valid))]
        rows += [(i, p) for i, p, ok in zip(kept, probabilities, valid.tolist(), strict=True) if ok]
    rows = sorted(r for part in distributed.all_gather(rows, run.device) for r in part)
    return np.array([i for i, _ in rows], dtype=np.int64), np.array([p for _, p in rows], dtype=np.float64)


def suspect_scores(probabilities, given):
    """Per photo: (score, suggested class): score 1 - p(given class), the suggestion the most probable class."""
    return 1.0 - probabilities[np.arange(len(given)), given], probabilities.argmax(axis=1)


def ranked_suspects(samples, classes, indices, probabilities):
    """[(file, given class, suggested class, score)], the most suspect first (ties in file order)."""
    given = np.array([samples[i][1] for i in indices], dtype=np.int64)
    scores, suggested = suspect_scores(probabilities, given)
    order = sorted(range(len(indices)), key=lambda k: (-scores[k], samples[indices[k]][0]))
    return [(samples[indices[k]][0], classes[given[k]], classes[suggested[k]], float(scores[k])) for k in order]


def write_suspect_labels(model, loaders, run, log):
    """OUTPUT_DIR/suspect_labels.csv: every training photo, the most suspect label first. Every process
    calls it; rank 0 writes and logs."""
    indices, probabilities = training_probabilities(model, loaders, run)
    distributed.run_on_main(run.device, _write, loaders.train.dataset.samples, run.record.classes, indices,
                            probabilities, run.args.output_dir, log)


def _write(samples, classes, indices, probabilities, output_dir, log):
    ranked = ranked_suspects(samples, classes, indices, probabilities)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUSPECT_FIELDS)
    writer.writerows([file, given, suggested, f"{score:.4f}"] for file, given, suggested, score in ranked)
    path = os.path.join(output_dir, "suspect_labels.csv")
    atomic_write_text(path, out.getvalue())
    doubted = sum(given != suggested for _, given, suggested, _ in ranked)
    log(f"suspect labels: the model ends up preferring another class for {doubted:,} of {len(ranked):,} training "
        f"photos; all of them, the least likely label first, are in {path} "
        f"(python report.py {output_dir} draws the first ones)")
