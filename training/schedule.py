"""How long a run is and how it changes over its epochs: the Plan (how many epochs, and with
--time-budget how they were fitted into the minutes given), the learning rate's factor per epoch,
and the training crop's size per epoch (--image-size 96:160, progressive resizing).

Without --time-budget the plan is --epochs from the start and every schedule is what it always
was. With it, the run times its first two epochs (the first also fills the image cache), then
fixes the number of epochs that fit; a run that falls behind (a busy machine) re-plans fewer. A
change of plan never jumps: the schedules continue from where they are and reach their ends at the
new last epoch. Every plan made is recorded in Plan.changes and saved in last.pth, so --resume
follows the same schedules.
"""
import math
from dataclasses import asdict, dataclass, field

SLACK = 0.03  # re-plan when the epochs left would end more than 3% past (or short of) the budget
AVERAGED = 3  # epoch times are predicted from the mean of the last whole epochs
MAX_EPOCHS = 10_000  # what a budget run may plan at most, whatever its epochs take
SIZE_STEP = 32  # progressive resizing moves in steps of 32 pixels, as FFCV's ImageNet recipe does


@dataclass
class Plan:
    epochs: int  # the run's epochs as planned now
    budget_s: float = 0.0  # --time-budget in seconds; 0: --epochs decides
    elapsed_s: float = 0.0  # seconds the run has taken so far, over every session, as of the last save
    changes: list = field(default_factory=list)  # [(from epoch, epochs)], each plan made, in order
    measured: list = field(default_factory=list)  # [image size, training s, other s] of each whole epoch
    cap: int = 0  # with a budget: --epochs as given (0: none)

    @property
    def planned(self):
        return bool(self.changes)

    def position(self, epoch, start=0):
        """Where `epoch` is in the part of the run that begins at epoch `start`, as (done, steps,
        span): the fraction done + steps / span x (1 - done) is 0 at start and 1 at the end of the
        last epoch. done is what the plans before the current one had covered: each change of plan
        carries on from where the previous one had got to, so the fraction never jumps."""
        done, at, epochs = 0.0, start, None
        for since, planned in self.changes:
            if since > epoch:
                break
            if epochs is not None and since > at:
                done += (since - at) / max(1, epochs - at) * (1 - done)
                at = since
            epochs = planned
        if epochs is None:
            return 0.0, 0, 1
        return done, epoch - at, max(1, epochs - at)

    def fraction(self, epoch, start=0):
        done, steps, span = self.position(epoch, start)
        return done + steps / span * (1 - done)

    def to_dict(self):
        return asdict(self)

    def load(self, saved):
        """Take the fields of a plan saved with to_dict, in place (the learning-rate schedule holds this object)."""
        for key, value in saved.items():
            setattr(self, key, [tuple(c) for c in value] if key == "changes" else value)


def fixed_plan(epochs):
    return Plan(epochs, changes=[(0, epochs)])


def budget_plan(minutes, cap=None):
    """A --time-budget plan before its first epoch: the number of epochs is found after it."""
    return Plan(cap or MAX_EPOCHS, budget_s=60.0 * minutes, cap=cap or 0)


def lr_factor(epoch, plan, warmup_epochs, schedule, step_size, gamma):
    """The learning rate's factor in an epoch: linear warm-up, then constant, a cosine to zero at
    the plan's end, or step decay."""
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    if schedule == "cosine":
        done, steps, span = plan.position(epoch, warmup_epochs)
        # one plan from the start: pi x steps / span, to the last bit what this schedule always was
        angle = math.pi * steps / span if done == 0 else math.pi * (done + steps / span * (1 - done))
        return 0.5 * (1 + math.cos(angle))
    if schedule == "step":
        return gamma ** ((epoch - warmup_epochs) // step_size)
    return 1.0


def image_size(epoch, plan, sizes):
    """The training crop of an epoch: sizes = (first, last); it grows linearly from the first
    epoch's crop to the last epoch's in steps of 32 (before a budget run is planned: the first)."""
    first, last = sizes
    if first == last or not plan.planned:
        return first
    grown = first + (last - first) * min(1.0, plan.fraction(epoch + 1))
    return min(last, max(first, int(grown / SIZE_STEP + 0.5) * SIZE_STEP))


def predicted_seconds(plan, epoch, sizes):
    """An epoch's seconds from the last whole epochs measured (up to 3, the run's first only while
    it is the only one): their training time per pixel of crop times this epoch's crop, plus the
    rest (validation, saving) as it was."""
    recent = (plan.measured[1:] or plan.measured)[-AVERAGED:]  # the first epoch also filled the image cache
    per_pixel = sum(train_s / size ** 2 for size, train_s, _ in recent) / len(recent)
    other = sum(other_s for _, _, other_s in recent) / len(recent)
    return per_pixel * image_size(epoch, plan, sizes) ** 2 + other


def fitting_epochs(plan, done, elapsed_s, sizes):
    """The most epochs whose predicted time, from epoch `done` on, ends within the budget (at least
    `done`: the run stops now), under the plan as it would be with that many."""
    most = plan.cap or MAX_EPOCHS
    if sizes[0] == sizes[1]:  # every epoch alike: no need to try each count
        each = max(predicted_seconds(plan, done, sizes), 1e-9)
        return min(most, done + max(0, int((plan.budget_s - elapsed_s) / each)))
    # A plan of one more epoch takes longer: it adds an epoch, and each of its later epochs is at
    # least as large as the one before it in the shorter plan. So the counts that fit are those up
    # to one, found by bisection; trying every count summed every epoch of each (3,287 epochs: 10 s).
    fit, over = done, most + 1
    while over - fit > 1:
        middle = (fit + over) // 2
        if elapsed_s + planned_seconds(plan, done, middle, sizes) > plan.budget_s:
            over = middle
        else:
            fit = middle
    return fit


def planned_seconds(plan, done, epochs, sizes):
    """Predicted seconds of epochs done .. epochs - 1 under the plan re-planned at `done` to `epochs`.
    The crop only grows, so its epochs come in runs of one size: each run is found by bisection
    and costs one multiplication, not a sum over its epochs."""
    trial = Plan(epochs, plan.budget_s, changes=plan.changes + [(done, epochs)], measured=plan.measured)
    total, start = 0.0, done
    while start < epochs:
        size = image_size(start, trial, sizes)
        low, high = start + 1, epochs  # the run of `size` ends before `high`, and reaches at least `low`
        while low < high:
            middle = (low + high) // 2
            if image_size(middle, trial, sizes) == size:
                low = middle + 1
            else:
                high = middle
        total += (low - start) * predicted_seconds(trial, start, sizes)
        start = low
    return total


def replan(plan, done, elapsed_s, sizes):
    """After an epoch of a budget run: the first two epochs fix the plan (the first also fills the
    image cache); later, a run whose epochs left would end more than 3% past or short of the budget
    (a machine that got busier, or quieter) is re-planned. Returns a line saying what was decided,
    or None."""
    if not plan.budget_s or not plan.measured:
        return None
    projected = elapsed_s + sum(predicted_seconds(plan, e, sizes) for e in range(done, plan.epochs))
    if done > 2 and abs(projected - plan.budget_s) <= SLACK * plan.budget_s:
        return None
    epochs = fitting_epochs(plan, done, elapsed_s, sizes)
    if plan.planned and epochs == plan.epochs:
        return None
    late = plan.planned and done > 2 and projected > plan.budget_s
    early = plan.planned and done > 2 and not late
    plan.changes.append((done, epochs))
    plan.epochs = epochs
    size, _, _ = plan.measured[-1]
    each = f"{predicted_seconds(plan, done - 1, sizes):.0f} s an epoch at {size} px"
    if late or early:
        return (f"plan: {'behind' if late else 'ahead of'} time ({elapsed_s / 60:.1f} of {plan.budget_s / 60:g} "
                f"min used after {done} epochs, {each} now): {epochs} epochs in all")
    return f"plan: {epochs} epochs fit in {plan.budget_s / 60:g} min at {each}"


def out_of_patience(args, progress):
    """Why the run ends early (--patience), or None while it may go on."""
    waited = progress.epoch - progress.best_epoch
    if not args.patience or progress.best_epoch == 0 or waited < args.patience:
        return None
    planned = (f"; the {args.lr_scheduler} schedule was planned for {progress.plan.epochs} epochs"
               if args.lr_scheduler != "none" and progress.epoch < progress.plan.epochs else "")
    return (f"stopping early after epoch {progress.epoch}: val {args.best_metric} has not improved for "
            f"{waited} epochs (--patience {args.patience}; best {progress.best_score:.3f} at epoch "
            f"{progress.best_epoch}){planned}")
