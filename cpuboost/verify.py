"""Compare an optimized model's outputs with the original's."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from cpuboost.report import NumericsCheck


def _leaves(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


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
        r64, c64 = r.detach().double(), c.detach().double()
        if r64.numel() == 0:
            continue
        diff = (r64 - c64).abs().max().item()
        scale = r64.abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
        compared += 1
    ok = max_rel <= rtol and max_rel == max_rel  # NaN fails
    return NumericsCheck(max_abs, max_rel, rtol, ok, compared)
