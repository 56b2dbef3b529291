"""Small statistics for tables over seeds: mean / sample std, and the difference of two means with its interval."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is NaN for a single value (no spread measured)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` and its two-sided confidence interval (NaN bounds when it cannot be estimated)."""

    value: float
    low: float
    high: float

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def welch_difference(a: list[float], b: list[float], confidence: float = 0.95) -> Difference:
    """Difference of means with Welch's t interval (unequal variances, Welch-Satterthwaite degrees of freedom).

    Needs at least two values on each side for an interval; with fewer only the difference is returned. When
    both samples have zero spread the interval collapses onto the difference.
    """
    if not a or not b:
        return Difference(math.nan, math.nan, math.nan)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, math.nan, math.nan)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(diff, diff, diff)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, dof)) * se
    return Difference(diff, diff - half, diff + half)
