"""The run's length and shape: --time-budget plans the epochs that fit and ends on time, --image-size
FIRST:LAST grows the crops, and both resume exactly. Time comes from a fake clock that ticks one
second per training step, so the plans are the same on every machine."""
import argparse
import math
import re
import signal

import pytest
import torch

import train
from helpers import call, load, make_tree, train_argv
from plumbing import options
from training import schedule


# ---------------------------------------------------------------------------------------------
# the schedules
# ---------------------------------------------------------------------------------------------
def cosine_as_it_was(epoch, warmup, epochs):
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


@pytest.mark.parametrize("epochs,warmup", [(1, 0), (5, 1), (25, 3), (100, 3)])
def test_a_fixed_plan_is_the_cosine_it_always_was_to_the_last_bit(epochs, warmup):
    plan = schedule.fixed_plan(epochs)
    for epoch in range(epochs + 1):
        assert schedule.lr_factor(epoch, plan, warmup, "cosine", 10, 0.1) == cosine_as_it_was(epoch, warmup, epochs)


def test_a_change_of_plan_carries_on_without_a_jump():
    plan = schedule.fixed_plan(20)
    before = [schedule.lr_factor(e, plan, 2, "cosine", 10, 0.1) for e in range(20)]
    plan.changes.append((8, 14))  # from epoch 8 on, 14 epochs in all instead of 20
    plan.epochs = 14
    after = [schedule.lr_factor(e, plan, 2, "cosine", 10, 0.1) for e in range(14)]
    assert after[:9] == before[:9]  # what was run stays as it was (epoch 8 starts where it would have)
    steps = [a - b for a, b in zip(after[2:], after[3:])]
    assert all(s > 0 for s in steps)  # still falling every epoch after the warm-up
    assert max(steps) < 2.5 * max(a - b for a, b in zip(before[2:], before[3:]))  # faster, not a cliff
    assert schedule.lr_factor(14, plan, 2, "cosine", 10, 0.1) == pytest.approx(0.0, abs=1e-12)  # ends at the new end


def test_sizes_grow_linearly_in_steps_of_32_from_first_to_last():
    plan = schedule.fixed_plan(25)
    sizes = [schedule.image_size(e, plan, (96, 160)) for e in range(25)]
    assert sizes[0] == 96 and sizes[-1] == 160 and sorted(sizes) == sizes
    assert set(sizes) == {96, 128, 160} and sizes.count(128) > sizes.count(96)
    assert [schedule.image_size(e, plan, (128, 128)) for e in range(25)] == [128] * 25
    assert schedule.image_size(0, schedule.budget_plan(15), (96, 160)) == 96  # not planned yet: the first


def test_size_schedules_are_parsed_and_checked():
    assert options.size_schedule("128") == (128, 128)
    assert options.size_schedule("96:160") == (96, 160)
    for bad in ("100:160", "160:96", "16:64", "x:64"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.size_schedule(bad)


def test_a_budget_plan_fits_the_time_and_re_plans_when_off_course():
    plan = schedule.budget_plan(10)  # 600 s
    plan.measured.append([96, 26.0, 4.0])  # the first epoch also fills the image cache
    assert schedule.replan(plan, 1, 30.0, (96, 96)) == "plan: 20 epochs fit in 10 min at 30 s an epoch at 96 px"
    plan.measured.append([96, 20.0, 4.0])  # from the second on, the first epoch's time is left out
    assert schedule.replan(plan, 2, 54.0, (96, 96)) == "plan: 24 epochs fit in 10 min at 24 s an epoch at 96 px"
    assert 54 + 22 * 24 <= 600 < 54 + 23 * 24  # the most that fit
    plan.measured += [[96, 20.5, 4.0], [96, 19.5, 4.0]]
    assert schedule.replan(plan, 4, 102.0, (96, 96)) is None  # on time within 3%: no change
    plan.measured += [[96, 40.0, 4.0]] * 2  # the machine got busy: twice as slow
    line = schedule.replan(plan, 6, 190.0, (96, 96))
    assert line.startswith("plan: behind time (3.2 of 10 min used after 6 epochs, 37 s an epoch at 96 px now)")
    assert plan.changes[-1] == (6, plan.epochs) and plan.epochs == 6 + int((600 - 190) / (sum([19.5, 40, 40]) / 3 + 4))
    plan.measured += [[96, 10.0, 4.0]] * 3  # and then quiet again
    line = schedule.replan(plan, 9, 250.0, (96, 96))
    assert line.startswith("plan: ahead of time") and plan.epochs == 9 + int((600 - 250) / 14)
    grown = schedule.budget_plan(10)
    grown.measured.append([96, 20.0, 4.0])
    schedule.replan(grown, 1, 24.0, (96, 160))
    assert grown.epochs < 24  # larger crops later cost more: fewer epochs fit


# ---------------------------------------------------------------------------------------------
# end to end, with a clock that ticks once per training step
# ---------------------------------------------------------------------------------------------
class StepClock:
    """Seconds = training steps taken in this process so far."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ticking(clock, stop_at=None):
    """A StopRequest.check that advances clock by a second per step (and asks to stop after step stop_at)."""
    steps = {"n": 0}

    def check(self, device, diverged=False, unreadable=False):
        clock.now += 1.0
        steps["n"] += 1
        return diverged, steps["n"] == stop_at, unreadable

    return check


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("budget") / "data", n_train=4, n_val=1)  # 3 steps of 4 an epoch


def test_a_budget_run_plans_ends_on_time_and_resumes_exactly(tree, tmp_path, monkeypatch):
    argv = ["--time-budget", 0.4, "--image-size", 32, "--warmup-epochs", 1]  # 24 s of 3-second epochs
    clock = StepClock()
    monkeypatch.setattr(train, "clock", clock)
    monkeypatch.setattr(train.StopRequest, "check", ticking(clock))
    code, stdout, err = call(train, train_argv(tree, tmp_path / "A", *argv, epochs=None))
    assert code == 0, err
    assert "train 1/? (32 px)" in stdout
    assert re.findall(r"(?:^|\r)(plan: [^\r\n]*)", stdout, re.M) == ["plan: 8 epochs fit in 0.4 min at 3 s an epoch at 32 px"]
    assert len((tmp_path / "A" / "metrics.csv").read_text().splitlines()) == 1 + 8
    assert "24.0 s" not in stdout and "; 0.4 of 0.4 min;" in stdout  # ended on the budget, not past it
    reference = load(tmp_path / "A" / "last.pth")
    assert reference["plan"]["epochs"] == 8 and reference["plan"]["changes"] == [(1, 8)]
    assert reference["plan"]["elapsed_s"] == pytest.approx(24.0)

    clock.now = 0.0  # a new session: its clock starts again, the run's minutes go on
    monkeypatch.setattr(train.StopRequest, "check", ticking(clock, stop_at=14))  # in epoch 5
    out = tmp_path / "B"
    code, stdout, _ = call(train, train_argv(tree, out, *argv, "--save-every", 1, epochs=None))
    assert code == 128 + signal.SIGTERM and "stopped at epoch 5, step 2" in stdout
    clock.now = 0.0
    monkeypatch.setattr(train.StopRequest, "check", ticking(clock))
    code, stdout, err = call(train, train_argv(tree, out, *argv, "--resume", out / "last.pth", epochs=None))
    assert code == 0, err
    assert "plan:" not in stdout  # the saved plan goes on
    resumed = load(out / "last.pth")
    same = ("epochs", "budget_s", "changes", "cap")  # "measured" lacks the epoch the stop cut in two
    assert {k: resumed["plan"][k] for k in same} == {k: reference["plan"][k] for k in same}
    assert resumed["plan"]["elapsed_s"] == pytest.approx(24.0)
    for key in ("model", "model_ema", "optimizer"):
        flat = (lambda d: d["state"]) if key == "optimizer" else (lambda d: d)
        assert torch.equal(torch.cat([v.flatten().float() for v in _tensors(flat(resumed[key]))]),
                           torch.cat([v.flatten().float() for v in _tensors(flat(reference[key]))])), key
    code, _, err = call(train, train_argv(tree, out, "--resume", out / "last.pth", "--image-size", 32))
    assert code == 2 and "resume it with --time-budget 0.4" in err


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    return []


def test_progressive_resizing_changes_the_crop_at_the_planned_epochs_and_resumes_exactly(tree, tmp_path, monkeypatch):
    argv = ["--image-size", "32:64", "--warmup-epochs", 0]
    code, stdout, err = call(train, train_argv(tree, tmp_path / "A", *argv, epochs=3))
    assert code == 0, err
    bars = re.findall(r"train (\d)/3 \((\d+) px\)", stdout)
    assert sorted(set(bars)) == [("1", "32"), ("2", "64"), ("3", "64")]
    assert "(32 to 64 px training crops, evaluation at 80 px)" in stdout
    best = load(tmp_path / "A" / "last.pth")
    assert (best["image_size"], best["image_size_schedule"], best["val_crop"]) == (64, [32, 64], 80)

    out = tmp_path / "B"
    from helpers import stop_after_step

    with monkeypatch.context() as m:
        m.setattr(train.StopRequest, "check", stop_after_step(5, out, tmp_path / "after_4.pth"))  # in epoch 2
        code, stdout, _ = call(train, train_argv(tree, out, *argv, "--save-every", 1, epochs=3))
    assert code == 128 + signal.SIGTERM
    assert "--image-size 32:64" in stdout  # the printed resume command keeps the schedule
    code, stdout, err = call(train, train_argv(tree, out, *argv, "--resume", tmp_path / "after_4.pth", epochs=3))
    assert code == 0, err
    assert re.search(r"train 2/3 \(64 px\)", stdout) and "(32 px)" not in stdout
    a, b = load(tmp_path / "A" / "last.pth"), load(out / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
