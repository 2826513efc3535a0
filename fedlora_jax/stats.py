"""Statistics of the comparison protocol (``fedlora-jax compare``), on plain arrays.

A run is a step curve: its accuracy is the last evaluation's until the next one (and after its
last), and nothing before its first. Time to target is censored at the wall-clock budget: a run
that misses the target (or reaches it after the budget) counts as the budget, so the restricted
mean time to target (Royston & Parmar, 2013) is defined for every strategy and never drops a
seed. Confidence intervals are percentile bootstrap intervals over seeds
(:func:`scipy.stats.bootstrap`); comparisons between strategies are paired by seed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
RESAMPLES = 4999


class Interval(NamedTuple):
    """A mean over seeds with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def mean_ci(values, *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
            seed: int = 0, axis: int = 0):
    """Mean of ``values`` along ``axis`` (the seeds) and its percentile bootstrap interval.

    Returns an :class:`Interval` of floats for 1-D input, else of arrays (one per remaining
    position, e.g. per point of a curve). With one seed the interval is the point itself."""
    values = np.asarray(values, np.float64)
    mean = values.mean(axis=axis)
    if values.shape[axis] < 2 or np.all(values == np.take(values, [0], axis=axis)):
        return Interval(*(np.asarray(mean)[()],) * 3)
    res = scipy_stats.bootstrap((values,), np.mean, axis=axis, confidence_level=confidence,
                                n_resamples=resamples, method="percentile",
                                random_state=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(np.asarray(mean)[()], np.asarray(ci.low)[()], np.asarray(ci.high)[()])


def step_value(times, values, at) -> np.ndarray:
    """The step curve ``(times, values)`` (times ascending) read at ``at``: the value of the last
    point at or before each ``at``, NaN before the first."""
    times, values = np.asarray(times, np.float64), np.asarray(values, np.float64)
    i = np.searchsorted(times, np.asarray(at, np.float64), side="right") - 1
    return np.where(i >= 0, values[np.maximum(i, 0)], np.nan)


def first_crossing(times, values, target: float) -> float:
    """The first time the curve is at or above ``target``; ``inf`` if never."""
    hit = np.flatnonzero(np.asarray(values) >= target)
    return float(np.asarray(times, np.float64)[hit[0]]) if hit.size else np.inf


def censor(times, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """``(min(time, budget), reached)``: times to target censored at the budget, and whether
    each seed reached the target within it."""
    times = np.asarray(times, np.float64)
    return np.minimum(times, budget), times <= budget


def curve_mean(xs, values) -> float:
    """Mean of the piecewise-linear curve through ``(xs, values)`` (xs ascending) over
    ``[xs[0], xs[-1]]``: its trapezoidal area over its length, every point counted."""
    xs, values = np.asarray(xs, np.float64), np.asarray(values, np.float64)
    if xs.size < 2 or xs[-1] <= xs[0]:
        raise ValueError(f"curve_mean needs points spanning an interval, got xs={xs.tolist()}.")
    return float(np.trapezoid(values, xs) / (xs[-1] - xs[0]))


def area_under(times, values, budget: float) -> float:
    """Mean of the step curve over ``[0, budget]`` (its normalized area): rewards reaching high
    accuracy early, and needs no target. The curve must start at time 0."""
    times, values = np.asarray(times, np.float64), np.asarray(values, np.float64)
    if not times.size or times[0] > 0:
        raise ValueError("area_under needs a curve that starts at time 0 (the round-0 evaluation).")
    inside = times < budget
    edges = np.append(times[inside], budget)
    return float(np.sum(values[inside] * np.diff(edges)) / budget)


def paired_log_ratios(method, baseline) -> np.ndarray:
    """Per seed ``log(method / baseline)`` of censored times (negative: the method is faster);
    0 where the two are equal (e.g. both missed the target)."""
    method, baseline = np.asarray(method, np.float64), np.asarray(baseline, np.float64)
    if method.shape != baseline.shape:
        raise ValueError(f"Paired times need one value per seed for both, got shapes "
                         f"{method.shape} and {baseline.shape}.")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(method == baseline, 0.0, np.log(method / baseline))


class Paired(NamedTuple):
    """A method against a baseline over paired seeds."""

    faster: float  # share of seeds where the method's censored time is strictly shorter
    ties: float  # share of seeds with equal censored times (e.g. both missed)
    log_ratio: Interval  # mean of log(method / baseline) and its CI

    @property
    def ratio(self) -> Interval:
        """The geometric-mean time ratio ``exp(mean log ratio)`` and its CI (< 1: faster)."""
        return Interval(*np.exp(self.log_ratio))


def paired(method, baseline, **bootstrap) -> Paired:
    """Share of seeds the method is faster, and the mean paired log ratio with its CI."""
    logs = paired_log_ratios(method, baseline)
    return Paired(float(np.mean(logs < 0)), float(np.mean(logs == 0)),
                  mean_ci(logs, **bootstrap))
