"""Activation observers: what range of values a layer's input takes during calibration, and the
clip range to quantize it with.

* ``minmax``: the whole observed range. Exact, but one outlier spends the 256 levels on itself.
* ``histogram``: the clip range minimizing the expected squared quantization error (rounding
  noise inside the range + clipping error outside), searched over a histogram of every value.
* ``percentile``: clip at a percentile of |values| on each side (e.g. 99.99).

All statistics are exact and order-independent (min/max, integer bin counts), so the result
does not depend on the number of threads. A NaN or inf raises, naming the layer; huge but
finite values are handled (the range is kept in float64; no integer conversion can overflow)
and reported by the caller.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from cpuboost.errors import CalibrationError

BINS = 2048
_GRID = 128  # candidate clip points per side in the histogram search


class Observer:
    """Tracks the running min/max of the tensors it sees. Subclasses pick the clip range."""

    def __init__(self, name: str):
        self.name = name
        self.lo = math.inf
        self.hi = -math.inf
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        lo, hi = float(lo), float(hi)  # NaN propagates through aminmax
        if not (math.isfinite(lo) and math.isfinite(hi)):
            what = "NaN" if math.isnan(lo) or math.isnan(hi) else "inf"
            raise CalibrationError(
                f"the input of {self.name!r} contains {what} in calibration batch "
                f"{self.batches + 1}; a quantization range cannot cover it. Check the "
                "calibration data (or the layers before this one), or keep this layer in float "
                "with config=StaticInt8Config(skip=(...,)).")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.batches += 1

    @property
    def seen(self) -> bool:
        return self.batches > 0

    def clip_range(self) -> tuple[float, float]:
        return self.lo, self.hi


class MinMaxObserver(Observer):
    pass


class HistogramObserver(Observer):
    """Keeps an exact histogram of all values over a range that grows as needed: when a batch
    exceeds it, the range doubles (around the old one) and old bins merge pairwise, so counts
    are never redistributed by approximation."""

    def __init__(self, name: str):
        super().__init__(name)
        self.counts: Optional[torch.Tensor] = None  # int64 (BINS,)
        self.left = self.width = 0.0  # histogram covers [left, left + width)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        if x.numel() == 0:
            return
        if self.counts is None:
            lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
            self.left, self.width = lo, max(hi - lo, 1e-30)
            self.counts = torch.zeros(BINS, dtype=torch.int64)
        while self.lo < self.left or self.hi >= self.left + self.width:
            self._grow()
        idx = ((x.detach().double().reshape(-1) - self.left) * (BINS / self.width)).long()
        self.counts += torch.bincount(idx.clamp_(0, BINS - 1), minlength=BINS)

    def _grow(self) -> None:
        pairs = self.counts.view(BINS // 2, 2).sum(dim=1)
        new = torch.zeros(BINS, dtype=torch.int64)
        # grow towards one side that overflowed; observe() repeats until the batch fits
        if self.lo < self.left:
            new[BINS // 2:] = pairs
            self.left -= self.width
        else:
            new[:BINS // 2] = pairs
        self.width *= 2
        self.counts = new

    def _centers(self) -> torch.Tensor:
        return self.left + (torch.arange(BINS, dtype=torch.float64) + 0.5) * (self.width / BINS)

    def clip_range(self) -> tuple[float, float]:
        if self.counts is None or self.counts.sum() == 0:
            return super().clip_range()
        n = self.counts.double()
        c = self._centers()
        # prefix sums give the clipping error of any range in O(1): sum n (a - c)^2 below a
        p0, p1, p2 = (torch.cumsum(n * c ** k, 0) for k in (0, 1, 2))
        total = p0[-1], p1[-1], p2[-1]
        zero = min(max(int(-self.left / self.width * BINS), 0), BINS - 1)  # bin holding 0
        # candidate clips spaced geometrically from 0: outliers can put the best clip at a
        # small fraction of the observed range
        frac = torch.logspace(-3, 0, _GRID, dtype=torch.float64)
        lo_i = (zero - (frac * zero).round()).long().unique()
        hi_i = (zero + (frac * (BINS - 1 - zero)).round()).long().unique()
        edge = self.width / BINS
        a = (self.left + lo_i * edge).clamp(max=0.0)[:, None]  # candidate lower clips
        b = (self.left + (hi_i + 1) * edge).clamp(min=0.0)[None, :]  # upper clips
        below = lo_i[:, None]  # bins fully below a: indices < lo_i
        n_lo = torch.where(below > 0, p0[(below - 1).clamp(min=0)], torch.zeros(()))
        s1_lo = torch.where(below > 0, p1[(below - 1).clamp(min=0)], torch.zeros(()))
        s2_lo = torch.where(below > 0, p2[(below - 1).clamp(min=0)], torch.zeros(()))
        above = hi_i[None, :]  # bins > hi_i lie above b
        n_hi, s1_hi, s2_hi = (t - p[above] for t, p in zip(total, (p0, p1, p2)))
        clip = (a * a * n_lo - 2 * a * s1_lo + s2_lo) + (b * b * n_hi - 2 * b * s1_hi + s2_hi)
        step = (b - a) / 255
        inside = total[0] - n_lo - n_hi
        err = clip + inside * step * step / 12
        best = int(torch.argmin(err))
        i, j = divmod(best, len(hi_i))
        lo = max(float(a[i, 0]), self.lo) if self.lo < 0 else 0.0
        hi = min(float(b[0, j]), self.hi) if self.hi > 0 else 0.0
        return lo, hi


class PercentileObserver(HistogramObserver):
    def __init__(self, name: str, percentile: float = 99.99):
        super().__init__(name)
        self.percentile = percentile

    def clip_range(self) -> tuple[float, float]:
        if self.counts is None or self.counts.sum() == 0:
            return super(HistogramObserver, self).clip_range()
        cdf = torch.cumsum(self.counts.double(), 0) / self.counts.sum()
        tail = 1.0 - self.percentile / 100
        edges = self.left + torch.arange(1, BINS + 1, dtype=torch.float64) * (self.width / BINS)
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        lo = max(float(edges[lo_bin]) - self.width / BINS, self.lo)
        hi = min(float(edges[min(hi_bin, BINS - 1)]), self.hi)
        return min(lo, 0.0), max(hi, 0.0)


OBSERVERS = {"minmax": MinMaxObserver, "histogram": HistogramObserver,
             "percentile": PercentileObserver}


def make_observer(kind: str, name: str, percentile: float) -> Observer:
    if kind == "percentile":
        return PercentileObserver(name, percentile)
    return OBSERVERS[kind](name)
