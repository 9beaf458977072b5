"""Swap Linear / Conv1d-3d / ConvTranspose2d-3d for modules that run oneDNN on weights
reordered once, for the input shape the model was seen with. The packed weight replaces the
original (state_dict still shows the original)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from cpuboost.checks import BF16_WEIGHTS_NOTE
from cpuboost.hw.features import onednn_runs
from cpuboost.nn import FusedConv, FusedConvTranspose, FusedLinear, set_backend
from cpuboost.nn.fused import FusedConv1DLinear, _Fused, is_hf_conv1d
from cpuboost.nn.probe import why_not_plain_linear
from cpuboost.passes._context import PassContext, names_of, replace_module
from cpuboost.passes.kernel_choice import linear_backend
from cpuboost.passes.winograd import use_winograd

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose2d, nn.ConvTranspose3d)


def _conv_padding(m) -> Optional[tuple[int, ...]]:
    if not isinstance(m.padding, str):
        return tuple(m.padding)
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]  # padding="same"
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


def tied_weight_owner(model: nn.Module, m: nn.Module) -> Optional[str]:
    for name, other in model.named_modules():
        if other is not m and any(p is m.weight for p in other.parameters(recurse=False)):
            return name
    return None


def why_not_packable(model: nn.Module, m: nn.Module, parents: dict) -> Optional[str]:
    if isinstance(m, _Fused):
        return None
    kind = type(m)
    if isinstance(m, nn.Linear):
        differs = why_not_plain_linear(m)
        if differs:
            return differs
    elif not is_hf_conv1d(m) and kind not in _CONVS + _CONV_T:
        return f"{kind.__name__} is not a Linear/Conv/ConvTranspose"
    if any(isinstance(p, nn.MultiheadAttention) for p in parents.get(id(m), ())):
        return "nn.MultiheadAttention reads this projection's .weight tensor directly"
    if torch.nn.utils.parametrize.is_parametrized(m):
        return "the weight is parametrized"
    if m.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {m.weight.dtype} is not a float32/bfloat16/float16"
    owner = tied_weight_owner(model, m)
    if owner is not None:
        return f"its weight is tied to {owner or 'the root'}; packing would keep it twice"
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if kind in _CONVS and _conv_padding(m) is None:
        return "padding='same' with an even kernel pads unevenly"
    if kind in _CONV_T and m.groups != 1:
        return "grouped ConvTranspose"
    return None


def to_fused(model, m, ctx: PassContext, backend: str, input_shape=None) -> _Fused:
    """The fused module standing for ``m`` (made and swapped in if ``m`` is a plain module)."""
    dtype = ctx.config.compute_dtype
    if isinstance(m, _Fused):
        set_backend(m, backend, pack_shape=input_shape, batch_hint=_batch(input_shape))
        return m
    held = ctx.config.weight_dtype if backend == "avx2" else None
    if isinstance(m, nn.Linear):
        new = FusedLinear(m, dtype, backend, batch_hint=_batch(input_shape), weight_dtype=held)
    elif is_hf_conv1d(m):
        new = FusedConv1DLinear(m, dtype, backend, batch_hint=_batch(input_shape),
                                weight_dtype=held)
    elif type(m) in _CONV_T:
        new = FusedConvTranspose(m, dtype, backend, input_shape=input_shape)
    else:
        new = FusedConv(m, _conv_padding(m), dtype, backend, input_shape=input_shape,
                        channels_last=ctx.config.channels_last)
    replace_module(model, m, new)
    if ctx.flow is not None:
        ctx.flow.rebind(m, new)
    return new


def _batch(shape) -> Optional[int]:
    return math.prod(shape[:-1]) if shape else None


def module_parents(model: nn.Module) -> dict:
    out = {}
    for parent in model.modules():
        for child in parent.children():
            out.setdefault(id(child), []).append(parent)
    return out


def _backend(ctx: PassContext) -> str:
    cfg = ctx.config
    onednn_ok = onednn_runs(cfg.compute_dtype, ctx.hw)
    if cfg.weights_prepack and not onednn_ok:  # an explicit request was refused up front
        ctx.record.notes.append(f"oneDNN cannot run {cfg.compute_dtype} here: weights are held "
                                "in that dtype but computed by aten kernels")
    return "onednn" if cfg.weights_prepack and onednn_ok else "aten"


def _linear_backend(m: nn.Module, backend: str, ctx: PassContext) -> str:
    """A float32 linear runs cpuboost's AVX2 kernel where oneDNN would, on CPUs with AVX2 but no
    AVX-512: BERT-base's GEMMs with cold weights ran 1.1-1.4x oneDNN's speed at 17-128 tokens,
    1.05x at 1024 (docs/compile.md)."""
    linear = isinstance(m, (nn.Linear, FusedLinear)) or is_hf_conv1d(m)
    if backend != "onednn" or not linear or ctx.config.compute_dtype != torch.float32:
        return backend
    if (m.weight.shape[0] if is_hf_conv1d(m) else m.in_features) == 0:
        return backend  # nothing to multiply: the output is the bias
    from cpuboost.kernels import gemm_ops, gemm_unavailable
    if gemm_ops():
        return "avx2"
    why = gemm_unavailable() or ""
    note = f"cpuboost's AVX2 linear kernel is not used, oneDNN's is: {why}"
    if why.startswith("the kernel did not build") and note not in ctx.record.notes:
        ctx.record.notes.append(note)  # the CPU suits it but the build failed: say so once
    return backend


def _conv_backend(m: nn.Module, backend: str, shape, ctx: PassContext) -> str:
    """A float32 3x3 Conv2d runs cpuboost's Winograd kernel where oneDNN would, on CPUs with
    AVX2 but no AVX-512, for the shapes where it measured faster (passes.winograd)."""
    if backend != "onednn" or not isinstance(m, (nn.Conv2d, FusedConv)) or not shape or \
            len(m.kernel_size) != 2:
        return backend
    padding = _conv_padding(m) if isinstance(m, nn.Conv2d) else m.padding
    ok = padding is not None and use_winograd(
        m.kernel_size, m.stride, m.dilation, m.groups, padding, m.in_channels, m.out_channels,
        ctx.config.compute_dtype, shape)
    return "winograd" if ok else backend


def prepack(model: nn.Module, ctx: PassContext) -> nn.Module:
    backend = _backend(ctx)
    if ctx.config.bf16_weights:
        ctx.record.notes.append(BF16_WEIGHTS_NOTE)
    parents = module_parents(model)
    for name, m in list(model.named_modules()):
        packable = isinstance(m, (nn.Linear, _Fused) + _CONVS + _CONV_T) or is_hf_conv1d(m)
        if not packable or not names_of(model, m):
            continue
        reason = why_not_packable(model, m, parents)
        if reason:
            ctx.record.skip(name, reason)
            continue
        shape = ctx.flow.first_shape(m) if ctx.flow else None
        chosen = _conv_backend(m, _linear_backend(m, backend, ctx), shape, ctx)
        if ctx.config.measure_kernels and chosen == "onednn" and isinstance(m, nn.Linear) and shape:
            chosen, t_dnn, t_aten = linear_backend(shape, m.out_features, ctx.config.compute_dtype,
                                                   m.bias is not None)
            if chosen == "aten":
                ctx.record.notes.append(f"{name}: aten measured faster than oneDNN "
                                        f"({t_aten * 1e6:.0f} vs {t_dnn * 1e6:.0f} us)")
        fused = to_fused(model, m, ctx, chosen, input_shape=shape)
        where = f" for input {list(shape)}" if shape and not isinstance(fused, FusedLinear) else ""
        dtype = ctx.config.compute_dtype
        if fused.weight_dtype != dtype:
            dtype = f"{fused.weight_dtype} weights, {dtype}"
        ctx.record.apply(f"{name}: {type(fused).__name__} ({chosen}, {dtype}){where}")
    return model
