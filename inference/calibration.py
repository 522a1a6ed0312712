"""Probabilities that can be trusted: the temperature that calibrates them, the threshold below which
a photo is answered "unknown", and the figures that judge both (ECE, NLL, accuracy against coverage).

numpy only: predict.py with a .onnx file applies the temperature and the threshold without torch.
train.py fits both on the val photos when training ends (training/evaluation.py) and stores them in
best.pth ("temperature", "min_confidence", "not_sure_score", "calibration"); export.py copies them
into the .onnx file's metadata. Weights without them (older files, plain state dicts) have T = 1 and
no threshold.

The threshold applies to one of SCORES, the one the weights record (train.py --not-sure-score, energy
unless told: docs/trust.md measured it best; max_probability for weights that record none, which
were all thresholded on the top probability), computed from the logits divided by the temperature:

    max_probability  the top probability: the number predict.py shows, in [0, 1]
    energy           T x log-sum-exp(logits / T), the negative free energy (Liu et al. 2020)
    rotation         KL(uniform || probabilities) plus the rotation head's mean log-probability of the
                     right quarter turn over the four turns of the photo (the OpenOOD "rotpred" score,
                     after Hendrycks et al. 2019); weights with a rotation head only

Higher means surer for each; a photo scoring below the threshold is answered UNKNOWN.
"""
import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15  # equal-width bins of the top probability, as Guo et al. (2017) report ECE
ANSWERED = 0.95  # the share of val photos the threshold answers
# Fewer val photos than this fit no temperature and set no threshold: the 5% rule refuses none of
# fewer than 20 photos, and a temperature from a handful of them is noise.
MIN_FIT_IMAGES = 20
TEMPERATURE_RANGE = (0.05, 20.0)  # the search's bounds: a fit that ends on one says so
COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)  # the rows of the risk-coverage table
UNKNOWN = "unknown"  # the class of a photo whose "not sure" score is below the threshold
# The "not sure" scores. The first, the top probability, is what weights that record no score were
# thresholded on; DEFAULT_SCORE is what train.py stores unless told (docs/trust.md: the best far and
# near AUROC of those measured, at no cost in accuracy or time).
SCORES = ("max_probability", "energy", "rotation")
DEFAULT_SCORE = "energy"
SCORE_NAMES = {"max_probability": "top probability", "energy": "energy score", "rotation": "rotation score"}


def no_threshold(score):
    """The threshold that answers every photo: 0 for a probability, -inf for the unbounded scores."""
    return 0.0 if score == "max_probability" else -math.inf


@dataclass(frozen=True)
class Calibration:
    """How a model's logits become the probabilities shown, softmax(logits / temperature), and when
    a photo is answered UNKNOWN: when its `score` (one of SCORES) is below min_confidence (0 for the
    top probability, -inf for the others: never)."""

    temperature: float = 1.0
    min_confidence: float = 0.0
    score: str = SCORES[0]

    def with_min_confidence(self, value):
        """This calibration with a threshold on the top probability (--min-confidence: a probability,
        whichever score the weights record), or itself for None."""
        return self if value is None else Calibration(self.temperature, float(value), SCORES[0])

    @property
    def needs_rotation(self):
        """Whether the score needs the rotation head's agreement (model.rotation_agreement)."""
        return self.score == "rotation"

    @property
    def answers_all(self):
        return self.min_confidence == no_threshold(self.score)

    def metadata(self):
        """The entries of a .onnx file's metadata (strings, as ONNX stores them)."""
        return {"temperature": repr(float(self.temperature)), "min_confidence": repr(float(self.min_confidence)),
                "not_sure_score": self.score}


def of_checkpoint(loaded):
    """The Calibration a checkpoint dict records (T = 1, no threshold where it records none)."""
    score = loaded.get("not_sure_score") or SCORES[0]
    threshold = loaded.get("min_confidence")
    return Calibration(float(loaded.get("temperature") or 1.0),
                       no_threshold(score) if threshold is None else float(threshold), score)


def of_metadata(metadata):
    """The Calibration a .onnx file's metadata records (T = 1, no threshold for older files); None
    for entries that are no numbers or an unknown score."""
    score = metadata.get("not_sure_score", SCORES[0])
    if score not in SCORES:
        return None
    try:
        return Calibration(float(metadata.get("temperature", 1.0)),
                           float(metadata.get("min_confidence", no_threshold(score))), score)
    except ValueError:
        return None  # the caller names the file


def softmax(logits, temperature=1.0):
    """Row-wise softmax(logits / temperature) in float32 (float64 in, float64 out)."""
    logits = np.asarray(logits)
    z = (logits if logits.dtype == np.float64 else logits.astype(np.float32)) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sureness(score, logits, temperature=1.0, rotation=None):
    """The "not sure" score of each image (N, float64; higher: surer), one of SCORES, from its logits
    (N x classes) and, for "rotation", its rotation agreement (N: model.rotation_agreement)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    log_sum = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    if score == "max_probability":
        return np.exp(top[:, 0] - log_sum)
    if score == "energy":
        return temperature * log_sum
    if score == "rotation":
        if rotation is None:
            raise ValueError("the rotation score needs the rotation head's agreement")
        log_p = z - log_sum[:, None]
        return -math.log(z.shape[1]) - log_p.mean(axis=1) + np.asarray(rotation, dtype=np.float64)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def nll(logits, labels, temperature=1.0):
    """The mean negative log-likelihood of the labels under softmax(logits / temperature), in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(z)), np.asarray(labels)].mean())


def fit_temperature(logits, labels, bounds=TEMPERATURE_RANGE, iterations=100):
    """The one temperature T that minimises the NLL of softmax(logits / T) on these labels.

    The NLL is convex in 1 / T, so it has one minimum along log T: a golden-section search between
    the bounds finds it to float precision in 100 steps. When every image is classified right, the
    NLL falls all the way to T -> 0 and no finite temperature is the answer; None then (callers keep
    T = 1). A result on a bound means the minimum lies beyond it."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0 or (logits.argmax(axis=1) == labels).all():
        return None
    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(logits, labels, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(logits, labels, math.exp(b))
    best = (low + high) / 2
    for end in (math.log(bounds[0]), math.log(bounds[1])):  # a minimum beyond a bound: the bound itself
        if nll(logits, labels, math.exp(end)) < nll(logits, labels, math.exp(best)):
            best = end
    return math.exp(best)


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """ECE: over `bins` equal-width bins of the top probability ((0, 1/bins], ..., ((bins-1)/bins, 1]),
    the mean of |accuracy - mean top probability| of each bin, weighted by its share of the images."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    table = reliability_table(probabilities, labels, bins)
    return float(sum(n * abs(accuracy - confidence) for n, confidence, accuracy in table if n) / len(labels))


def reliability_table(probabilities, labels, bins=ECE_BINS):
    """Per bin of the top probability: (images, their mean top probability, their accuracy); (0, nan,
    nan) for an empty bin. What the reliability diagram draws and the ECE sums."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    top = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(top * bins).astype(int) - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        chosen = index == b
        n = int(chosen.sum())
        table.append((n, float(top[chosen].mean()) if n else float("nan"),
                      float(right[chosen].mean()) if n else float("nan")))
    return table


def choose_min_confidence(top_probabilities, answered=ANSWERED, score=SCORES[0]):
    """The threshold on the top probability (or on another of SCORES) that answers `answered` of
    these photos (at least that share: the photos refused are the floor((1 - answered) * n) least
    sure). It lies halfway between the last photo refused and the first answered, so that the same
    photo computed again (another batch, another runtime: differences of 1e-7) falls on the same
    side. no_threshold(score) when none is refused."""
    top = np.sort(np.asarray(top_probabilities, dtype=np.float64))
    refused = int(math.floor((1 - answered) * len(top) + 1e-9))
    if refused == 0:
        return no_threshold(score)
    return float((top[refused - 1] + top[refused]) / 2)


def risk_coverage(probabilities, labels, coverages=COVERAGES):
    """Answering only the most confident photos: per coverage c, (c, the threshold that answers the
    ceil(c * n) most confident, how many those are, their accuracy)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    top = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == labels
    order = np.argsort(-top, kind="stable")
    rows = []
    for c in coverages:
        k = max(1, math.ceil(c * len(top) - 1e-9)) if len(top) else 0
        kept = order[:k]
        rows.append((c, float(top[kept].min()) if k else float("nan"), k,
                     float(right[kept].mean()) if k else float("nan")))
    return rows


def risk_coverage_curve(probabilities, labels):
    """(coverage, accuracy of the answered) for every number of most confident photos answered, 1..n."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    order = np.argsort(-probabilities.max(axis=1), kind="stable")
    right = (probabilities.argmax(axis=1) == labels)[order]
    answered = np.arange(1, len(right) + 1)
    return answered / max(len(right), 1), np.cumsum(right) / answered


def auroc(known_scores, unknown_scores):
    """The area under the ROC curve of a score that should be higher for known photos than for
    unknown ones: the chance that a random known photo scores above a random unknown one, ties
    counting half (the Mann-Whitney U statistic over both counts). nan when either set is empty."""
    known, unknown = np.asarray(known_scores, dtype=np.float64), np.asarray(unknown_scores, dtype=np.float64)
    if not len(known) or not len(unknown):
        return float("nan")
    _, where, counts = np.unique(np.concatenate([known, unknown]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where]  # 1-based, ties sharing their mean rank
    u = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2
    return float(u / (len(known) * len(unknown)))


@dataclass(frozen=True)
class Fit:
    """What fitting on a set of logits found: the calibration and the figures before and after."""

    calibration: Calibration
    images: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    answered: float  # the share of these images the threshold answers
    note: str = ""  # why the temperature stayed 1, or that it sits on a bound

    def record(self):
        """What a checkpoint keeps of the fit besides the two numbers (plain types: weights_only loads it)."""
        return {"images": self.images, "ece_bins": ECE_BINS, "nll_before": self.nll_before,
                "nll_after": self.nll_after, "ece_before": self.ece_before, "ece_after": self.ece_after,
                "answered": self.answered, "note": self.note}


def fit_calibration(logits, labels, answered=ANSWERED, score=SCORES[0], rotation=None):
    """The temperature and threshold of these (val) logits, with the figures before and after; None
    with fewer than MIN_FIT_IMAGES images. The threshold is on `score` (rotation: the images' rotation
    agreement, for that score)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(labels) < MIN_FIT_IMAGES:
        return None
    temperature, note = fit_temperature(logits, labels), ""
    if temperature is None:
        temperature, note = 1.0, "every image is classified right: no finite temperature fits; kept T = 1"
    elif not TEMPERATURE_RANGE[0] < temperature < TEMPERATURE_RANGE[1]:
        note = f"the NLL's minimum lies beyond the search's bound: T = {temperature:g}"
    calibrated = softmax(logits, temperature)
    sure = sureness(score, logits, temperature, rotation)
    min_confidence = choose_min_confidence(sure, answered, score)
    return Fit(Calibration(temperature, min_confidence, score), len(labels), nll(logits, labels),
               nll(logits, labels, temperature), expected_calibration_error(softmax(logits), labels),
               expected_calibration_error(calibrated, labels), float((sure >= min_confidence).mean()), note)
