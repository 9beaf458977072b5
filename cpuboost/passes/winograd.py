"""Which convolutions run cpuboost's Winograd kernel (``cpuboost::conv3x3_winograd``, F(4x4, 3x3)).

The kernel (``kernels/winograd_avx2.cpp``) is built where the AVX2 linear kernel is: CPUs with
AVX2 and FMA but no AVX-512. It takes float32 3x3 convolutions with stride 1, dilation 1, no
groups, padding 0-2 and channel counts that are multiples of 8, and applies bias, an added
tensor (a residual) and any post-op of ``POST_OPS`` in registers.

Where it pays was measured on the 2-core AVX2 Zen 3 (oneDNN's direct convolution vs the kernel,
batch 1, in = out channels, ReLU fused in both; ratio of medians, interleaved calls):

=========  =====  =====  =====  =====  =====  =====
channels   4x4    7x7    14x14  28x28  56x56  112x112
=========  =====  =====  =====  =====  =====  =====
8          3.16   2.58   2.28   1.85   1.05   0.66
16         2.74   2.71   2.16   1.77   1.43   0.98
32         2.71   2.47   1.89   1.85   1.34   1.46
64         2.21   2.15   1.76   2.18   2.24   1.82
128        1.35   1.98   1.99   2.61   2.24   2.61
256        1.00   1.92   1.87   2.62   2.59
512        0.62   1.09   1.90   2.62
=========  =====  =====  =====  =====  =====  =====

It loses where too little arithmetic meets too many bytes: few channels on a large image (the
transformed tiles pass through memory; oneDNN's direct kernel reads the image once), or many
channels on a few tiles (the transformed weight is 4x the 3x3 weight and is read once per call).
:func:`winograd_pays` draws those two lines, the second one stricter than speed alone would:
512 channels at 7x7 and batch 1 (4 tiles) gained 1.09-1.25x, 0.3 ms per layer, for 28 MB more
weight per layer, so it stays on oneDNN (ResNet-50's weights: 94 MB, 136 MB with its eleven
other 3x3 layers transformed, 193 MB with those two as well). Batch 16 over the ResNet-50
shapes: 2.12x.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def use_winograd(kernel, stride, dilation, groups, padding, in_channels: int,
                 out_channels: int, dtype: torch.dtype, input_size) -> bool:
    """Whether a convolution with these parameters, on an input of ``input_size`` [N, C, H, W],
    runs the kernel: it qualifies, pays for that shape, and the kernel runs on this CPU."""
    if why_not_winograd(kernel, stride, dilation, groups, padding, in_channels, out_channels,
                        dtype) or len(input_size) != 4:
        return False
    n, _, h, w = input_size
    if not winograd_pays(in_channels, out_channels, h + 2 * padding[0] - 2,
                         w + 2 * padding[1] - 2, n):
        return False
    from cpuboost.kernels import gemm_ops
    return gemm_ops()


def why_not_winograd(kernel, stride, dilation, groups, padding, in_channels: int,
                     out_channels: int, dtype: torch.dtype) -> Optional[str]:
    """Why a convolution with these parameters cannot run the kernel, or None if it can."""
    if dtype != torch.float32:
        return f"it computes in float32 only, not {dtype}"
    if tuple(kernel) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return "not a 3x3 convolution with stride 1 and dilation 1"
    if groups != 1:
        return "grouped"
    if len(padding) != 2 or any(not 0 <= p <= 2 for p in padding):
        return f"padding {list(padding)} (0-2 on each side is supported)"
    if in_channels % 8 or out_channels % 8:
        return f"{in_channels} in / {out_channels} out channels (multiples of 8 are supported)"
    return None


def winograd_pays(in_channels: int, out_channels: int, out_h: int, out_w: int,
                  batch: int = 1) -> bool:
    """Whether the kernel beats oneDNN's direct convolution for this shape (module docstring)."""
    tiles = batch * math.ceil(out_h / 4) * math.ceil(out_w / 4)
    if tiles * 64 < max(in_channels, out_channels):
        return False  # the 4x larger weight read for too few tiles, or gaining too little for it
    fewest = min(in_channels, out_channels)
    if fewest >= 32:
        return True
    return out_h * out_w <= (56 * 56 if fewest >= 16 else 28 * 28)
