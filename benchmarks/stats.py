"""Small statistics helpers: percentiles, medians of repeats with their spread, formatting."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


@dataclass(frozen=True)
class Spread:
    """The median of per-repeat figures, with their min and max."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, digits: int = 1, unit: str = "") -> str:
        if self.n == 0:
            return "n/a"
        m = _num(self.median, digits)
        if self.n == 1 or self.lo == self.hi:
            return f"{m}{unit}"
        return f"{m}{unit} ({_num(self.lo, digits)}-{_num(self.hi, digits)})"

    def ratio(self, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.median:.{digits}f}x"
        return f"{self.median:.{digits}f}x ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def _num(x: float, digits: int) -> str:
    if math.isnan(x):
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def ratios(num: Sequence[float], den: Sequence[float]) -> Spread:
    """Per-repeat ratios num[i]/den[i] (the runs of one repeat are interleaved)."""
    out = []
    for a, b in zip(num, den, strict=False):
        if b and not math.isnan(a) and not math.isnan(b):
            out.append(a / b)
    return Spread.of(out)
