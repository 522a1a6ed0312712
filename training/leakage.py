"""Leakage: val images that are copies of training images, found from the perceptual hashes the
image caches keep after an epoch has decoded every image once (no file read or decoded again).

    check_leakage   one log line and output_dir/leakage.csv when val images copy training images
    near_copies     the (val, training, distance) pairs within images.NEAR_COPY_BITS bits
"""
import contextlib
import csv
import io
import os

import numpy as np

from inference import images
from plumbing import distributed
from plumbing.atomic import atomic_write_text

LEAKAGE_FIELDS = ["val_file", "train_file", "distance"]


def near_copies(train_hashes, val_hashes, threshold=images.NEAR_COPY_BITS):
    """Sorted (val index, training index, distance) of every pair of a val and a training image whose
    perceptual hashes are within threshold bits; each argument is (indices, uint64 hashes)."""
    (train_index, train_hash), (val_index, val_hash) = train_hashes, val_hashes
    if not len(train_hash) or not len(val_hash):
        return []
    # the band search runs over distinct hashes: a node stands for every image with that hash
    distinct, node = np.unique(np.concatenate([train_hash, val_hash]), return_inverse=True)
    train_node, val_node = node[:len(train_hash)], node[len(train_hash):]
    i, j, distance = images.near_pairs(distinct, threshold)
    same = np.intersect1d(train_node, val_node)  # a val and a training image with one hash: 0 bits
    val_end = np.concatenate([i, j, same])
    train_end = np.concatenate([j, i, same])
    bits = np.concatenate([distance, distance, np.zeros(len(same), np.int64)])
    val_at, train_at = {}, {}
    for at, nodes, index, ends in ((val_at, val_node, val_index, val_end), (train_at, train_node, train_index,
                                                                              train_end)):
        wanted = np.isin(nodes, ends)
        for n, k in zip(nodes[wanted].tolist(), index[wanted].tolist()):
            at.setdefault(n, []).append(k)
    return sorted((v, t, d) for a, b, d in zip(val_end.tolist(), train_end.tolist(), bits.tolist())
                  for v in val_at.get(a, ()) for t in train_at.get(b, ()))


def gathered_hashes(dataset, device):
    """(indices, hashes) of the images of dataset that any machine of the run has decoded: each
    machine's first process speaks for its cache, which all the machine's processes share."""
    local_rank, _ = distributed.local_rank_and_size()
    parts = [p for p in distributed.all_gather(dataset.cache.hashes() if local_rank == 0 else None, device)
             if p is not None]
    indices, first = np.unique(np.concatenate([p[0] for p in parts]), return_index=True)
    return indices, np.concatenate([p[1] for p in parts])[first]


def check_leakage(train_set, val_set, output_dir, data_path, device, log):
    """After an epoch has decoded every image once: log one line when val images are copies of training
    images (their perceptual hashes, kept by the caches, within images.NEAR_COPY_BITS bits), and list
    every such pair in output_dir/leakage.csv. No file read again, no image decoded again. Every
    process calls it; rank 0 writes and logs."""
    train, val = gathered_hashes(train_set, device), gathered_hashes(val_set, device)
    distributed.run_on_main(device, _report_leakage, train_set, val_set, train, val, output_dir, data_path, log)


def _report_leakage(train_set, val_set, train, val, output_dir, data_path, log):
    pairs = near_copies(train, val)
    path = os.path.join(output_dir, "leakage.csv")
    if not pairs:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # an earlier run's list, in a folder this run took over
        return
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LEAKAGE_FIELDS)
    writer.writerows([val_set.samples[v][0], train_set.samples[t][0], d] for v, t, d in pairs)
    atomic_write_text(path, out.getvalue())
    readable = len(train_set) - len(train_set.unreadable())
    partly = (f" ({len(train[0]):,} of {readable:,} training images drawn so far)" if len(train[0]) < readable
              else "")  # --sampler balanced draws with replacement: an epoch need not draw every image
    log(f"leakage: {len({v for v, _, _ in pairs}):,} of {len(val[0]):,} val images are copies of training "
        f"images{partly} (perceptual hashes within {images.NEAR_COPY_BITS} bits): the pairs are in {path}; "
        f"`python -m data_set.check {data_path}` finds every copy in the data")
