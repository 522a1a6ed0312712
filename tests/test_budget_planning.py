"""schedule.fitting_epochs with progressive resizing: the same counts as trying every count in turn
(the straightforward way, kept here as the reference), and long plans computed without summing
every epoch of every candidate."""
import random

import pytest

from training import schedule

pytestmark = pytest.mark.quick


def reference_fitting_epochs(plan, done, elapsed_s, sizes):
    """Every count in turn, each summed over its epochs: what fitting_epochs computed until it
    took seconds for a long budget (O(epochs^2))."""
    most = plan.cap or schedule.MAX_EPOCHS
    best = done
    for epochs in range(done + 1, most + 1):
        trial = schedule.Plan(epochs, plan.budget_s, changes=plan.changes + [(done, epochs)], measured=plan.measured)
        total = elapsed_s + sum(schedule.predicted_seconds(trial, e, sizes) for e in range(done, epochs))
        if total > plan.budget_s:
            break
        best = epochs
    return best


def random_case(rng):
    """A budget plan part-way through a run, with a history of plans and measured epochs."""
    first = rng.choice([64, 96, 128])
    sizes = (first, first + 32 * rng.randint(1, 8))
    minutes = rng.uniform(0.5, 20)
    plan = schedule.budget_plan(minutes, cap=rng.choice([None, None, rng.randint(5, 300)]))
    done = rng.randint(1, 12)
    for _ in range(done):
        size = rng.choice(range(sizes[0], sizes[1] + 1, 32))
        plan.measured.append([size, rng.uniform(0.5, 10.0) * (size / 96) ** 2, rng.uniform(0.0, 2.0)])
    since = 0
    for _ in range(rng.randint(0, 3)):  # earlier plans, at increasing epochs up to `done`
        since = rng.randint(since, done)
        plan.changes.append((since, rng.randint(max(since, 1), 400)))
    elapsed = rng.uniform(0, 1.2) * sum(t + o for _, t, o in plan.measured)
    return plan, done, elapsed, sizes


@pytest.mark.parametrize("seed", range(12))
def test_fitting_epochs_with_progressive_resizing_matches_trying_every_count(seed):
    rng = random.Random(seed)
    for _ in range(5):
        plan, done, elapsed, sizes = random_case(rng)
        expected = reference_fitting_epochs(plan, done, elapsed, sizes)
        assert schedule.fitting_epochs(plan, done, elapsed, sizes) == expected, (plan, done, elapsed, sizes)


def test_fitting_epochs_at_the_edges_matches_trying_every_count():
    plan = schedule.budget_plan(10)
    plan.measured.append([96, 20.0, 4.0])
    assert schedule.fitting_epochs(plan, 1, 700.0, (96, 160)) == 1  # already past the budget: stop now
    assert reference_fitting_epochs(plan, 1, 700.0, (96, 160)) == 1
    capped = schedule.budget_plan(600, cap=7)  # far more time than the 7 epochs --epochs allows
    capped.measured.append([96, 20.0, 4.0])
    assert schedule.fitting_epochs(capped, 1, 24.0, (96, 160)) == 7
    assert reference_fitting_epochs(capped, 1, 24.0, (96, 160)) == 7


def straight_total(plan, done, epochs, elapsed_s, sizes):
    trial = schedule.Plan(epochs, plan.budget_s, changes=plan.changes + [(done, epochs)], measured=plan.measured)
    return elapsed_s + sum(schedule.predicted_seconds(trial, e, sizes) for e in range(done, epochs))


@pytest.mark.parametrize("epoch_s, expected_all", [(0.1, True), (1.4, False)])
def test_a_plan_of_thousands_of_epochs_is_the_most_that_fit(epoch_s, expected_all):
    """A 120-minute budget of short epochs at 96:160 (1.4 s: 3,287 epochs, one re-plan took 10 s
    before), and one whose count is the 10,000 a budget run may plan at most."""
    plan = schedule.budget_plan(120)
    plan.measured += [[96, epoch_s * 1.5, 0.0], [96, epoch_s, 0.0]]
    elapsed = 2.5 * epoch_s
    epochs = schedule.fitting_epochs(plan, 2, elapsed, (96, 160))
    if expected_all:
        assert epochs == schedule.MAX_EPOCHS
        assert straight_total(plan, 2, epochs, elapsed, (96, 160)) <= plan.budget_s
    else:
        assert 1000 < epochs < schedule.MAX_EPOCHS
        assert straight_total(plan, 2, epochs, elapsed, (96, 160)) <= plan.budget_s
        assert straight_total(plan, 2, epochs + 1, elapsed, (96, 160)) > plan.budget_s
