"""training/schedule.py: the run's length and shape. The learning rate per epoch (--lr-scheduler
cosine, step or none, after a warm-up), --time-budget that plans the epochs that fit and ends on
time, --image-size FIRST:LAST that grows the crops, --patience that ends a run that stopped
improving; each resumes exactly. Time comes from a fake clock that ticks one second per training
step, so the plans are the same on every machine."""
import csv
import math
import re
import signal
import weakref

import pytest
import torch

import train
from helpers import call, load, make_tree, stop_after_step, train_argv
from plumbing import stopping
from training import data, schedule


# ---------------------------------------------------------------------------------------------
# the schedules
# ---------------------------------------------------------------------------------------------
def cosine_as_it_was(epoch, warmup, epochs):
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


@pytest.mark.quick
@pytest.mark.parametrize("epochs,warmup", [(1, 0), (5, 1), (25, 3), (100, 3)])
def test_a_fixed_plan_is_the_cosine_it_always_was_to_the_last_bit(epochs, warmup):
    plan = schedule.fixed_plan(epochs)
    for epoch in range(epochs + 1):
        assert schedule.lr_factor(epoch, plan, warmup, "cosine", 10, 0.1) == cosine_as_it_was(epoch, warmup, epochs)


@pytest.mark.quick
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


@pytest.mark.quick
def test_step_and_constant_schedules_after_the_warm_up():
    plan = schedule.fixed_plan(10)
    step_factors = [schedule.lr_factor(e, plan, 2, "step", 3, 0.5) for e in range(10)]
    assert step_factors == [1 / 3, 2 / 3, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert [schedule.lr_factor(e, plan, 1, "none", 3, 0.5) for e in range(4)] == [0.5, 1, 1, 1]
    assert [schedule.lr_factor(e, plan, 0, "none", 3, 0.5) for e in range(3)] == [1, 1, 1]


@pytest.fixture(scope="module")
def one_step_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("lr") / "data", n_train=1, n_val=1)  # 3 images: one step an epoch


@pytest.mark.parametrize("extra,expected", [
    (["--lr-scheduler", "step", "--lr-step-size", 1, "--lr-gamma", 0.5, "--warmup-epochs", 0], [1.0, 0.5, 0.25]),
    (["--lr-scheduler", "none", "--warmup-epochs", 1], [0.5, 1.0, 1.0]),
], ids=["step", "none"])
def test_the_run_logs_the_learning_rate_its_schedule_gives(one_step_tree, tmp_path, extra, expected):
    out = tmp_path / "out"
    code, _, err = call(train, train_argv(one_step_tree, out, "--image-size", 32, "--lr", 0.01, "--no-model-ema",
                                          *extra, epochs=3))
    assert code == 0, err
    with open(out / "metrics.csv", newline="") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == pytest.approx([0.01 * f for f in expected])


@pytest.mark.quick
def test_sizes_grow_linearly_in_steps_of_32_from_first_to_last():
    plan = schedule.fixed_plan(25)
    sizes = [schedule.image_size(e, plan, (96, 160)) for e in range(25)]
    assert sizes[0] == 96 and sizes[-1] == 160 and sorted(sizes) == sizes
    assert set(sizes) == {96, 128, 160} and sizes.count(128) > sizes.count(96)
    assert [schedule.image_size(e, plan, (128, 128)) for e in range(25)] == [128] * 25
    assert schedule.image_size(0, schedule.budget_plan(15), (96, 160)) == 96  # not planned yet: the first


@pytest.mark.quick
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
    argv = ["--time-budget", 0.2, "--image-size", 32, "--warmup-epochs", 1]  # 12 s of 3-second epochs
    clock = StepClock()
    monkeypatch.setattr(train, "clock", clock)
    monkeypatch.setattr(stopping.StopRequest, "check", ticking(clock))
    code, stdout, err = call(train, train_argv(tree, tmp_path / "A", *argv, epochs=None))
    assert code == 0, err
    assert "train 1/? (32 px)" in stdout
    plans = re.findall(r"(?:^|\r)(plan: [^\r\n]*)", stdout, re.M)
    assert plans == ["plan: 4 epochs fit in 0.2 min at 3 s an epoch at 32 px"]
    assert len((tmp_path / "A" / "metrics.csv").read_text().splitlines()) == 1 + 4
    assert "; 0.2 of 0.2 min;" in stdout  # ended on the budget, not past it
    reference = load(tmp_path / "A" / "last.pth")
    assert reference["plan"]["epochs"] == 4 and reference["plan"]["changes"] == [(1, 4)]
    assert reference["plan"]["elapsed_s"] == pytest.approx(12.0)

    clock.now = 0.0  # a new session: its clock starts again, the run's minutes go on
    monkeypatch.setattr(stopping.StopRequest, "check", ticking(clock, stop_at=8))  # in epoch 3; the stop saves last.pth
    out = tmp_path / "B"
    code, stdout, _ = call(train, train_argv(tree, out, *argv, epochs=None))
    assert code == 128 + signal.SIGTERM and "stopped at epoch 3, step 2" in stdout
    clock.now = 0.0
    monkeypatch.setattr(stopping.StopRequest, "check", ticking(clock))
    code, stdout, err = call(train, ["--resume", out / "last.pth"])
    assert code == 0, err
    assert "plan:" not in stdout  # the saved plan goes on
    resumed = load(out / "last.pth")
    same = ("epochs", "budget_s", "changes", "cap")  # "measured" lacks the epoch the stop cut in two
    assert {k: resumed["plan"][k] for k in same} == {k: reference["plan"][k] for k in same}
    assert resumed["plan"]["elapsed_s"] == pytest.approx(12.0)
    for key in ("model", "model_ema", "optimizer"):
        resumed_state = resumed[key]["state"] if key == "optimizer" else resumed[key]
        reference_state = reference[key]["state"] if key == "optimizer" else reference[key]
        assert torch.equal(torch.cat([v.flatten().float() for v in _tensors(resumed_state)]),
                           torch.cat([v.flatten().float() for v in _tensors(reference_state)])), key


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
    with monkeypatch.context() as m:  # stopped in epoch 2; epoch 1's end left the place to resume from
        m.setattr(stopping.StopRequest, "check", stop_after_step(4, out, tmp_path / "after_epoch_1.pth"))
        code, stdout, _ = call(train, train_argv(tree, out, *argv, epochs=3))
    assert code == 128 + signal.SIGTERM
    code, stdout, err = call(train, train_argv(tree, out, *argv, "--resume", tmp_path / "after_epoch_1.pth", epochs=3))
    assert code == 0, err
    assert re.search(r"train 2/3 \(64 px\)", stdout) and "(32 px)" not in stdout
    a, b = load(tmp_path / "A" / "last.pth"), load(out / "last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_progressive_resizing_lets_the_first_loaders_workers_go(tree, tmp_path, monkeypatch):
    """A loader's persistent workers end when nothing holds the loader: after each change of crop
    size nothing may hold the one before (the run's first loader was once held to the end)."""
    replaced = []
    with_crop = data.with_crop

    def watching(loaders, size, args, device):
        before = weakref.ref(loaders.train)
        with_crop(loaders, size, args, device)
        if loaders.train is not before():
            replaced.append(before)

    monkeypatch.setattr(data, "with_crop", watching)
    argv = train_argv(tree, tmp_path / "out", "--image-size", "32:96", "--cache", "off", epochs=3)
    argv[argv.index("--workers") + 1] = "1"
    code, _, err = call(train, argv)
    assert code == 0, err
    assert len(replaced) == 2 and all(ref() is None for ref in replaced)  # crops 32, 64, 96


# ---------------------------------------------------------------------------------------------
# stopping when it stops improving
# ---------------------------------------------------------------------------------------------
def test_patience_ends_the_run_says_why_and_stays_ended_on_resume(tmp_path):
    tree = make_tree(tmp_path / "data", n_train=2, n_val=1)
    out = tmp_path / "out"
    argv = train_argv(tree, out, "--image-size", 32, "--lr", "1e-12", "--patience", 2, epochs=6)  # nothing improves
    code, stdout, err = call(train, argv)
    assert code == 0, err
    stopping = [line for line in stdout.splitlines() if line.startswith("stopping early")]
    assert stopping == ["stopping early after epoch 3: val accuracy has not improved for 2 epochs (--patience 2; "
                        f"best {load(out / 'best.pth')['val_accuracy']:.3f} at epoch 1); the cosine schedule was "
                        "planned for 6 epochs"]
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert load(out / "last.pth")["epoch"] == 3 and load(out / "best.pth")["epoch"] == 1
    code, stdout, err = call(train, ["--resume", out / "last.pth"])
    assert code == 0 and "stopping early after epoch 3" in stdout and "train 4/6" not in stdout
