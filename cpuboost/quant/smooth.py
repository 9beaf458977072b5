"""SmoothQuant (Xiao et al., 2023) for Linear layers, with the strength searched per layer.

Transformer activations have a few channels with ranges 10-100x the rest; one per-tensor int8
scale then spends its levels on them. Dividing input channel j by s_j and multiplying weight
column j by s_j leaves the product unchanged and moves that range into the weight, which is
quantized per output channel and absorbs it better:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

Here the division is part of the int8 layer's own input quantization (one multiply, fused into
the quantize step when compiled), so it applies to every Linear — also those after GELU, whose
inputs no LayerNorm could absorb — and needs no change to other modules.

Per layer, alpha is chosen from a grid (and "no smoothing") by the error of the int8 product
on the rows of the first calibration batch, with ranges taken from the other batches (held
out: see ChannelStats). The per-tensor range of X / s used in the end follows exactly from the
per-channel min/max of all batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from cpuboost.nn.int8 import quantize_weight
from cpuboost.nn.int8 import affine_qparams

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_SAMPLE_ROWS = 256  # rows of the first calibration input kept per layer for the search
_FLOOR = 1e-5


class ChannelStats:
    """Per-input-channel min and max of a Linear's input (last dim), over all calibration
    batches and over all but the first, whose rows are kept as a held-out sample: smoothing
    tuned to the per-channel maxima of the data it is judged on looks better than it is (an
    input outside the calibrated range of a channel is clipped hard once each channel's range
    is tight), so candidates are judged on rows their ranges did not see."""

    def __init__(self):
        self.lo = self.hi = None  # all batches
        self.rest_lo = self.rest_hi = None  # all but the first
        self.sample: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # (M, K)
        lo, hi = rows.amin(0).double(), rows.amax(0).double()
        if self.sample is None:
            step = max(1, rows.shape[0] // _SAMPLE_ROWS)
            self.sample = rows[::step][:_SAMPLE_ROWS].clone()
        else:
            self.rest_lo = lo if self.rest_lo is None else torch.minimum(self.rest_lo, lo)
            self.rest_hi = hi if self.rest_hi is None else torch.maximum(self.rest_hi, hi)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def judging_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ranges to judge candidates with: the held-out ones when there are."""
        if self.rest_lo is None:
            return self.lo, self.hi
        return self.rest_lo, self.rest_hi


@dataclass(frozen=True)
class Smoothing:
    scale: Optional[torch.Tensor]  # s per input channel, or None: not smoothed
    alpha: Optional[float]
    qparams: tuple[float, int]  # uint8 scale / zero point of X / s
    error_ratio: float  # int8 product error with this choice / without smoothing


def _fake_int8(x: torch.Tensor, w: torch.Tensor, qparams, qmax: int, per_channel: bool):
    scale, zp = qparams
    xq = (torch.clamp(torch.round(x / scale) + zp, 0, qmax) - zp) * scale
    qw, w_scale = quantize_weight(w, per_channel)
    return xq @ (qw.float() * w_scale[:, None]).t()  # (M, out)


def judge_clip(stats: ChannelStats, weight: torch.Tensor, candidates: list[tuple[float, int]],
               qmax: int, per_channel: bool) -> tuple[int, list[float]]:
    """Index of the input qparams, among ``candidates``, whose int8 product with the weight is
    nearest the float product on the layer's calibration rows, and each one's squared error.
    An activation histogram's L2-optimal clip ignores what the clipped values are multiplied
    by: in transformers a few outlier channels meet large weights, and clipping them costs
    more than the coarser grid of the full range (all-MiniLM-L6-v2: see docs/quantize.md)."""
    w = weight.detach().float()
    reference = stats.sample @ w.t()
    errs = [float((_fake_int8(stats.sample, w, qp, qmax, per_channel) - reference).pow(2).sum())
            for qp in candidates]
    return min(range(len(errs)), key=errs.__getitem__), errs


def choose(stats: ChannelStats, weight: torch.Tensor, qmax: int, symmetric: bool,
           per_channel: bool, alpha: Optional[float] = None,
           unsmoothed: Optional[tuple[float, int]] = None) -> Smoothing:
    """The smoothing with the least int8 error on the sample (None among the candidates).
    ``unsmoothed``: the input qparams the layer gets without smoothing (its observer's clip
    range, often tighter than min/max), so "none" is judged as it would really run."""
    w = weight.detach().float()  # (out, in)
    x = stats.sample
    reference = x @ w.t()
    amax_x = torch.maximum(stats.lo.abs(), stats.hi.abs()).float().clamp(min=_FLOOR)  # (in,)
    amax_w = w.abs().amax(0).clamp(min=_FLOOR)  # (in,)
    judge_lo, judge_hi = stats.judging_range()
    best: Optional[Smoothing] = None
    base_err = None
    for a in (None,) + ((alpha,) if alpha is not None else ALPHAS):
        s = None if a is None else (amax_x.pow(a) / amax_w.pow(1 - a)).clamp(min=_FLOOR)
        if s is None and unsmoothed is not None:
            judged = unsmoothed
        else:
            lo, hi = (judge_lo, judge_hi) if s is None else (judge_lo / s, judge_hi / s)
            judged = affine_qparams(float(lo.min()), float(hi.max()), qmax, symmetric)
        xs, ws = (x, w) if s is None else (x / s, w * s)
        err = float((_fake_int8(xs, ws, judged, qmax, per_channel) - reference).pow(2).sum())
        base_err = err if a is None else base_err
        if best is None or err < best.error_ratio * base_err:
            lo, hi = (stats.lo, stats.hi) if s is None else (stats.lo / s, stats.hi / s)
            qp = affine_qparams(float(lo.min()), float(hi.max()), qmax, symmetric)
            best = Smoothing(s, a, qp, err / max(base_err, 1e-30))
    return best


__all__ = ["ALPHAS", "ChannelStats", "Smoothing", "choose", "judge_clip"]
