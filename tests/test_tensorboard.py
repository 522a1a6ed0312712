"""train.py --tensorboard (training/metrics.py's TensorBoardLog): the event files read back with
TensorBoard's own reader, and a resumed run that continues the same curves with no step twice."""
import csv
import signal

import pytest

import train
from helpers import assert_clean_error, call, make_tree, needs, stop_after_step, train_argv
from plumbing import stopping

pytestmark = needs("tensorboard", why="--tensorboard needs it: requirements-dev.txt")


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tb") / "data", n_train=4, n_val=2)  # 12 train: 3 steps an epoch


@pytest.fixture(scope="module")
def straight(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "A"
    assert call(train, train_argv(tree, out, "--image-size", 48, "--tensorboard", epochs=2))[0] == 0
    return out


def test_epoch_and_step_scalars_match_metrics_csv(straight):
    logged = scalars(straight)
    assert sorted(logged) == sorted(["epoch", "lr", "train/loss", "train/accuracy", "val/loss", "val/accuracy",
                                     "images_per_s", "train/step_loss"])
    assert [s for s, _ in logged["train/step_loss"]] == [1, 2, 3, 4, 5, 6]
    with open(straight / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for tag, column in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("val/accuracy", "val_accuracy"),
                        ("lr", "lr"), ("images_per_s", "images_per_s"), ("train/accuracy", "train_accuracy")):
        assert [s for s, _ in logged[tag]] == [3, 6], tag  # each epoch at its last step
        assert [v for _, v in logged[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-5), tag
    assert [v for _, v in logged["epoch"]] == [1, 2]
    # the epoch's training loss is the mean of its steps' losses (all batches hold 4 images)
    steps = [v for _, v in logged["train/step_loss"]]
    assert logged["train/loss"][0][1] == pytest.approx(sum(steps[:3]) / 3, rel=1e-5)


def test_a_resumed_run_continues_the_curves_without_duplicate_steps(tree, straight, tmp_path, monkeypatch):
    """Stopped after step 4, resumed from the save at the end of epoch 1 (step 3): TensorBoard drops
    the orphaned step 4 and the curves end equal to the uninterrupted run's, each step once."""
    out, saved = tmp_path / "C", tmp_path / "after_epoch_1.pth"
    argv = train_argv(tree, out, "--image-size", 48, "--tensorboard", epochs=2)
    with monkeypatch.context() as m:
        m.setattr(stopping.StopRequest, "check", stop_after_step(4, out, saved))
        code, _, err = call(train, argv)
    assert code == 128 + signal.SIGTERM, err
    assert [s for s, _ in scalars(out)["train/step_loss"]] == [1, 2, 3, 4]
    code, stdout, err = call(train, argv + ["--resume", saved])
    assert code == 0, err
    assert "epoch 2, step 0" in stdout
    resumed, reference = scalars(out), scalars(straight)
    assert sorted(resumed) == sorted(reference)
    for tag in ("train/step_loss", "train/loss", "val/accuracy", "epoch"):
        assert resumed[tag] == reference[tag], tag  # same steps, once each, bit-exact values
    assert len(list((out / "tensorboard").iterdir())) == 2  # one event file per process run


def test_without_tensorboard_installed_one_line(tree, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    code, out, err = call(train, train_argv(tree, tmp_path / "x", "--image-size", 48, "--tensorboard"))
    assert_clean_error(code, err, "pip install tensorboard")
    assert "train 1/" not in out
