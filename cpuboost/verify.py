"""Compare an optimized model's outputs with the original's."""
from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_leaves

from cpuboost.report import NumericsCheck


def _leaves(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


_CHUNK = 1 << 20  # elements per float64 block: a 128x250002 MLM output is 256 MB in float64


def _blocks(r: torch.Tensor, c: torch.Tensor):
    """Matching views of r and c of at most ~_CHUNK elements (views, never copies: an output
    may be non-contiguous, and reshape would copy it whole)."""
    if r.numel() <= _CHUNK:
        yield r, c
    elif r.dim() <= 1:
        for i in range(0, r.numel(), _CHUNK):
            yield r[i:i + _CHUNK], c[i:i + _CHUNK]
    else:
        step = max(1, _CHUNK * r.shape[0] // r.numel())
        for i in range(0, r.shape[0], step):
            if step == 1:
                yield from _blocks(r[i], c[i])
            else:
                yield r[i:i + step], c[i:i + step]


def _max_diff_and_scale(r: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """max |r - c| and max finite |r| in float64, a block at a time (no full-size temporaries).
    Elements equal in both (the same inf, or NaN in both) count as equal; a NaN or inf in only
    one of them makes the difference NaN or inf, which fails the check."""
    diff = scale = 0.0
    for rb, cb in _blocks(r, c):
        r64, c64 = rb.double(), cb.double()
        same = (r64 == c64) | (r64.isnan() & c64.isnan())
        d = torch.where(same, 0.0, (r64 - c64).abs()).max().item()
        diff = d if d != d else max(diff, d)  # a NaN stays NaN (and fails the check)
        scale = max(scale, torch.nan_to_num(r64.abs(), nan=0.0, posinf=0.0).max().item())
        if diff != diff:
            break
    return diff, scale


def compare(reference, candidate, rtol: float) -> NumericsCheck:
    """Max abs diff, and max diff relative to each output's largest magnitude (robust to
    outputs that cross zero, unlike elementwise relative error)."""
    refs, cands = _leaves(reference), _leaves(candidate)
    if len(refs) != len(cands):
        return NumericsCheck(float("inf"), float("inf"), rtol, False, 0)
    max_abs = max_rel = 0.0
    compared = 0
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            return NumericsCheck(float("inf"), float("inf"), rtol, False, compared)
        if not r.is_floating_point():
            if not torch.equal(r, c):
                return NumericsCheck(float("inf"), float("inf"), rtol, False, compared)
            continue
        if r.numel() == 0:
            continue
        diff, scale = _max_diff_and_scale(r.detach(), c.detach())
        rel = diff / scale if scale > 0 else diff
        # Python's max() drops a NaN (nan > x is False): keep it, so the check fails.
        max_abs = diff if diff != diff else max(max_abs, diff)
        max_rel = rel if rel != rel else max(max_rel, rel)
        compared += 1
    ok = max_rel <= rtol and max_rel == max_rel  # NaN fails
    return NumericsCheck(max_abs, max_rel, rtol, ok, compared)


def sqnr_db(reference, candidate) -> float:
    """Signal-to-quantization-noise ratio of candidate vs reference over all float outputs,
    in dB: 10 log10(sum r^2 / sum (r - c)^2). inf when equal; 20 dB ~ 10% error, 40 dB ~ 1%."""
    signal = noise = 0.0
    for r, c in zip(_leaves(reference), _leaves(candidate)):
        if r.is_floating_point() and r.shape == c.shape:
            for rb, cb in _blocks(r.detach(), c.detach()):
                r64 = rb.double()
                signal += float((r64 * r64).sum())
                noise += float(((r64 - cb.double()) ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")


def cosine(reference, candidate) -> float:
    """Cosine similarity of all float outputs, flattened into one vector each."""
    dot = rr = cc = 0.0
    for r, c in zip(_leaves(reference), _leaves(candidate)):
        if r.is_floating_point() and r.shape == c.shape:
            for rb, cb in _blocks(r.detach(), c.detach()):
                r64, c64 = rb.double(), cb.double()
                dot += float((r64 * c64).sum())
                rr += float((r64 * r64).sum())
                cc += float((c64 * c64).sum())
    return dot / math.sqrt(rr * cc) if rr > 0 and cc > 0 else float("nan")
