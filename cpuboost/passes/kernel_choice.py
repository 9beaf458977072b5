"""Pick a linear's kernel by timing both on this CPU for the shape the model runs.

oneDNN on pre-packed weights wins for most GEMMs here, but not for every shape (a GEMV with one
output feature ran 2x faster through aten on the 2-core Zen 4 this was built on), and other CPUs
differ. Choices are cached per (shape, dtype, threads) for the process.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

_CACHE: dict[tuple, tuple[str, float, float]] = {}
_MARGIN = 0.85  # aten must be clearly faster: timing on a busy machine is noisy
# Timing a 50257x768 LM head at full size allocated ~0.45 GB of random weights and packs while
# compiling; past this many weight elements the output features are cut (cost per feature is
# flat at that size), so measuring never costs more than a few tens of MB.
_MAX_WEIGHT_ELEMENTS = 1 << 22


def _best_of(fn, reps: int) -> float:
    fn()  # warm-up (first oneDNN call creates its primitive)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def _compare(key, m: int, k: int, n: int, dtype: torch.dtype, bias: bool, rival: str,
             margin: float) -> tuple[str, float, float]:
    """Time oneDNN's packed linear against ``rival`` ("aten" or "mkl") on random data of the
    given shape; the rival wins only if faster than ``margin`` x oneDNN. Cached by ``key``."""
    if key not in _CACHE:
        n = min(n, max(64, _MAX_WEIGHT_ELEMENTS // max(k, 1)))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        if rival == "mkl":
            mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            run_rival = lambda: torch.ops.mkl._mkl_linear(x, mkl_w, w, b, m)  # noqa: E731
        else:
            run_rival = lambda: F.linear(x, w, b)  # noqa: E731
        reps = max(1, min(50, int(2e7 / max(2 * m * k * n, 1))))  # ~a few ms per measurement
        with torch.no_grad():
            t_dnn = _best_of(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""), reps)
            t_rival = _best_of(run_rival, reps)
        _CACHE[key] = (rival if t_rival < margin * t_dnn else "onednn", t_dnn, t_rival)
    return _CACHE[key]


def linear_backend(in_shape: tuple[int, ...], out_features: int, dtype: torch.dtype,
                   bias: bool) -> tuple[str, float, float]:
    """("onednn" | "aten", onednn seconds, aten seconds) for x of ``in_shape`` @ W^T."""
    m, k = math.prod(in_shape[:-1]), in_shape[-1]
    key = ("aten", m, k, out_features, dtype, bias, torch.get_num_threads())
    return _compare(key, m, k, out_features, dtype, bias, "aten", _MARGIN)


def mkl_or_onednn(m: int, k: int, n: int, dtype: torch.dtype, bias: bool) -> tuple[str, float, float]:
    """("onednn" | "mkl", onednn seconds, mkl seconds) for Inductor's packed fp32 linear. MKL
    must be clearly faster: its packed linear keeps the original weight beside the pack (GPT-2's
    50257x768 head at M=1 measured 6.5 vs 6.6 ms, a coin flip that cost a second copy)."""
    key = ("mkl", m, k, n, dtype, bias, torch.get_num_threads())
    return _compare(key, m, k, n, dtype, bias, "mkl", _MARGIN)
