"""The report's statistics over seeds (definitions and limits: `jaxdpo.report`): mean ± standard
error, the Student-t interval of paired differences, areas under curves, and the labels a method
needs to match the baseline's final reward, with its bootstrap spread over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.special import stdtrit

from jaxdpo.report.metrics import Tracks, at_round, labels_at, rounds_of

RANDOM = "random"
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0


def paired_differences(method: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """method − baseline for each seed both have, in seed order."""
    return [method[seed] - baseline[seed] for seed in sorted(method.keys() & baseline.keys())]


def differences_by_round(tracks: Tracks, baseline: Tracks) -> list[tuple[int, int, list[float]]]:
    """(round, labels, paired differences to `baseline`) per round of `baseline`."""
    return [
        (round_, labels_at(baseline, round_), paired_differences(at_round(tracks, round_), at_round(baseline, round_)))
        for round_ in rounds_of(baseline)
    ]


def mean_stderr(values: Sequence[float] | np.ndarray) -> tuple[float, float | None]:
    """Mean and standard error (None for a single value)."""
    values = np.asarray(values, np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), stderr


def t_bounds(values: np.ndarray, *, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval of the mean over the last axis (n ≥ 2 values):
    mean ± t_{(1+confidence)/2, n−1} · s/√n, s the sample standard deviation (divisor n − 1)."""
    values = np.asarray(values, np.float64)
    n = values.shape[-1]
    half = stdtrit(n - 1, (1 + confidence) / 2) * values.std(axis=-1, ddof=1) / math.sqrt(n)  # the t quantile
    mean = values.mean(axis=-1)
    return np.asarray(mean - half), np.asarray(mean + half)


def t_interval(values: Sequence[float] | np.ndarray, *, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """`t_bounds` of one set of values; None for fewer than two."""
    if len(values) < 2:
        return None
    low, high = t_bounds(np.asarray(values, np.float64), confidence=confidence)
    return float(low), float(high)


def area_under_curve(labels: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray) -> float | None:
    """Trapezoid of `values` over `labels`, divided by the span of `labels`: the mean value over the
    labeling budget (None when fewer than two distinct label counts)."""
    order = np.argsort(labels, kind="stable")
    x, y = np.asarray(labels, np.float64)[order], np.asarray(values, np.float64)[order]
    if len(x) < 2 or x[-1] <= x[0]:
        return None
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


def auc_per_seed(tracks: Tracks) -> dict[int, float]:
    """{seed: area under its curve} for the seeds with at least two rounds."""
    areas = {seed: area_under_curve(*zip(*by_round.values())) for seed, by_round in tracks.items()}
    return {seed: area for seed, area in areas.items() if area is not None}


# -- labels to match the baseline -----------------------------------------------------------------


def labels_to_reach(labels: np.ndarray, values: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The labels at which each curve first reaches its target, by linear interpolation between the
    rounds around the crossing (the first label count when it starts there); +inf when it never
    does. `labels` [r] ascending, `values` [..., r], `target` [...]."""
    values, target = np.asarray(values, np.float64), np.asarray(target, np.float64)
    reached = values >= target[..., None]
    first = np.argmax(reached, axis=-1)
    before = np.maximum(first - 1, 0)
    y0, y1 = (np.take_along_axis(values, index[..., None], axis=-1)[..., 0] for index in (before, first))
    x0, x1 = labels[before], labels[first]
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = np.where(first == 0, labels[0], x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return np.where(reached.any(axis=-1), crossing, np.inf)


class LabelsToMatch(NamedTuple):
    """How many labels a method needs to reach the baseline's final mean reward (`target`, reached by
    the baseline with `budget` labels): `labels` on the seed-mean curves, and the same for each
    bootstrap resample of the seeds (`resamples`: with replacement, paired); +inf: not reached."""

    labels: float
    target: float
    budget: int
    resamples: np.ndarray


def labels_to_match(
    tracks: Tracks, baseline: Tracks, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> LabelsToMatch | None:
    """`LabelsToMatch` of `tracks` against `baseline`, over the seeds both have and, for each, the
    rounds every one of those seeds has (None when there is no such seed or round)."""
    seeds = sorted(tracks.keys() & baseline.keys())
    method_curve, base_curve = (_complete_rounds(t, seeds) for t in (tracks, baseline))
    if not seeds or method_curve is None or base_curve is None:
        return None
    (labels, values), (base_labels, base_values) = method_curve, base_curve
    picks = np.random.default_rng(seed).integers(0, len(seeds), size=(resamples, len(seeds)))
    target = base_values.mean(axis=0)[-1]
    resampled_targets = base_values[picks, -1].mean(axis=1)
    resampled = labels_to_reach(labels, values[picks].mean(axis=1), resampled_targets)
    point = labels_to_reach(labels, values.mean(axis=0), np.asarray(target))
    return LabelsToMatch(float(point), float(target), int(base_labels[-1]), resampled)


def _complete_rounds(tracks: Tracks, seeds: list[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels [r], values [seeds, r]) over the rounds every one of `seeds` has, in round order."""
    rounds = [r for r in rounds_of(tracks) if all(r in tracks.get(s, {}) for s in seeds)]
    if not rounds:
        return None
    labels = np.asarray([labels_at(tracks, r) for r in rounds], np.float64)
    return labels, np.asarray([[tracks[s][r][1] for r in rounds] for s in seeds], np.float64)
