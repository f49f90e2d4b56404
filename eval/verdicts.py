"""The one verdict rule of every small-scale claim (docs/verification.md): at least 3 seeds per arm; a claim is
"reproduced" when the difference points the claimed way by more than two standard errors, "not reproduced" when it
points the other way by more than two standard errors, and "inconclusive" otherwise."""

from __future__ import annotations

import math
import statistics

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
MIN_SEEDS = 3


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _standard_error(values: list[float]) -> float:
    return (statistics.stdev(values) / math.sqrt(len(values))) if len(values) > 1 else math.inf


def better(a: list[float], b: list[float], lower_is_better: bool = True) -> str:
    """The claim "arm a is better than arm b" on a metric, from each arm's per-seed values."""
    if min(len(a), len(b)) < MIN_SEEDS:
        return INCONCLUSIVE
    d = statistics.fmean(b) - statistics.fmean(a) if lower_is_better else statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(_standard_error(a) ** 2 + _standard_error(b) ** 2)
    if d > 2 * se:
        return REPRODUCED
    if d < -2 * se:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def below(values: list[float], threshold: float) -> str:
    """The claim "the metric is below the threshold", from per-seed values."""
    if len(values) < MIN_SEEDS:
        return INCONCLUSIVE
    m, se = statistics.fmean(values), _standard_error(values)
    if m + 2 * se < threshold:
        return REPRODUCED
    if m - 2 * se > threshold:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def above(values: list[float], threshold: float) -> str:
    """The claim "the metric is above the threshold"."""
    return below([-v for v in values], -threshold)
