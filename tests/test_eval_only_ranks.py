"""--eval-only under torchrun: a failure in one process ends every process at once, and the run's
error is one message, never a hang or a traceback from the processes that were waiting for it.

Two forked gloo processes run train.py --eval-only on the session's small run, each with the
environment torchrun gives it, and a fault in one of them: rank 0 cannot write predictions.csv
(a full disk), the --unknowns folder is missing on rank 1's machine, or an image that only rank 1
loads is unreadable under --bad-images error (two machines, so no shared image cache tells rank 0)."""
import os
import traceback

import pytest
import torch

import train
from helpers import call, eval_argv, make_tree, run_ranks, write_truncated_jpeg
from plumbing.atomic import SaveError
from plumbing.options import UserError
from training import data, evaluation

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _eval_worker(rank, port, argv, fault, machines, results):
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          LOCAL_RANK=str(rank if machines == 1 else 0), LOCAL_WORLD_SIZE=str(2 // machines),
                          GLOO_SOCKET_IFNAME="lo" if os.path.exists("/sys/class/net/lo") else "")
        torch.cuda.is_available = lambda: False  # gloo, as torchrun on a machine without GPUs
        torch.set_num_threads(1)  # the parent has used its thread pool, which a forked child cannot
        if fault == "rank 0 cannot write" and rank == 0:
            def full_disk(path, *args):
                raise SaveError(path, OSError(28, "No space left on device"))
            evaluation.write_predictions_csv = full_disk
        if fault == "folder missing on rank 1" and rank == 1:
            def missing(folder, *args):
                raise UserError(f"--unknowns folder {folder} does not exist: pass a folder of photos "
                                "of none of the classes")
            data.find_unknowns = missing
        code, out, err = call(train, argv)
        results.put((rank, code, out, err))
    except BaseException:
        results.put((rank, "crash", "", traceback.format_exc()))


@pytest.mark.parametrize("fault, machines, expected", [
    ("rank 0 cannot write", 1, "cannot write"),
    ("folder missing on rank 1", 1, "--unknowns folder"),
    ("unreadable image on rank 1", 2, "cannot read image"),
])
def test_a_fault_in_one_eval_only_process_ends_both_with_one_message(small_run, tmp_path, fault, machines,
                                                                      expected):
    test_set = make_tree(tmp_path / "test", n_train=1, n_val=2)
    if fault == "unreadable image on rank 1":
        # the evaluation sampler deals the images out in turn: the second is rank 1's
        folder = str(test_set / "val")
        write_truncated_jpeg(data.list_images(folder, data.find_classes(folder))[1][0])
    unknowns = make_tree(tmp_path / "unknowns", classes=("other",), n_train=2, n_val=0) / "train"
    argv = eval_argv(small_run["best"], test_set, tmp_path / "eval", "--unknowns", unknowns, "--batch-size", 1,
                     "--bad-images", "error", "--cache", "off")
    ranks = run_ranks(_eval_worker, argv, fault, machines)
    for rank, code, _, err in ranks:
        assert code not in (0, "crash"), (rank, code, err)
        assert "Traceback" not in err, (rank, err)
    errors = {line for _, _, _, err in ranks for line in err.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, ranks
    assert expected in errors.pop()
