"""Which layers int8 covers, why others stay float, and the int8 module standing for each.

* Linear (and transformers' Conv1D): int8 weights per output channel, int8 activations.
* Conv1d/2d/3d (BatchNorm folded first): the same, static activations only.
* EmbeddingBag (sum/mean) and, when asked, Embedding: weights only, 8-bit per row.
* LSTM / GRU: int8 weights, activations quantized per step (torch's dynamic int8 RNN modules).
"""
from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import nn

from cpuboost.nn.embedding import Int8Embedding, Int8EmbeddingBag
from cpuboost.nn.fused import (FusedConv, FusedConv1DLinear, FusedConvTranspose, FusedLinear,
                               _Fused, is_hf_conv1d)
from cpuboost.nn.int8 import Int8Conv, Int8Linear
from cpuboost.passes.prepack import (_conv_padding, module_parents, tied_weight_owner,
                                     why_not_packable)
from cpuboost.quant.config import QuantConfig
from cpuboost.quant.recipe import LayerRecipe
from cpuboost.report import PassRecord

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TABLES = ("embedding", "embedding_bag")
WEIGHT_ONLY = TABLES + ("rnn",)  # kinds without a calibrated activation scale


def kind_of(m: nn.Module) -> Optional[str]:
    if isinstance(m, (FusedLinear, nn.Linear)) or is_hf_conv1d(m):
        return "linear"
    if isinstance(m, (FusedConv,) + _CONVS):
        return "conv"
    if isinstance(m, (FusedConvTranspose, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed"
    if type(m) is nn.EmbeddingBag:
        return "embedding_bag"
    if type(m) is nn.Embedding:
        return "embedding"
    if type(m) in (nn.LSTM, nn.GRU):
        return "rnn"
    return None


def _why_float(model, m, kind: str, cfg: QuantConfig, parents) -> Optional[str]:
    if kind == "transposed":
        return "kept in float: torch has no oneDNN int8 ConvTranspose kernel"
    if cfg.dynamic and kind == "conv":
        return "dynamic int8 covers Linear layers; convs need static calibration"
    if kind == "embedding" and not cfg.embedding:
        return "kept in float: Embedding int8 is off by default (embedding=True turns it on)"
    if kind == "embedding_bag" and not cfg.embedding_bag:
        return "kept in float: embedding_bag=False"
    if kind == "rnn":
        return None if cfg.rnn else "kept in float: rnn=False"
    if kind in TABLES:
        if kind == "embedding_bag" and m.mode not in Int8EmbeddingBag.MODES:
            return f"mode={m.mode!r}: torch's int8 embedding-bag kernel sums (sum/mean only)"
        if m.max_norm is not None:
            return "max_norm renormalizes rows on lookup, which an int8 table cannot"
        owner = tied_weight_owner(model, m)
        return None if owner is None else f"its weight is tied to {owner or 'the root'}"
    if isinstance(m, _Fused) and m.backend != "aten":
        return "already packed by cpuboost.optimize: quantize the original model"
    return why_not_packable(model, m, parents)


def targets(model: nn.Module, cfg: QuantConfig, rec: PassRecord,
            layers: dict[str, LayerRecipe]) -> dict[str, nn.Module]:
    """Modules to quantize, by name (a module registered twice is taken once). Layers kept in
    float on request enter the recipe as fp32."""
    parents, found, seen = module_parents(model), {}, set()
    for name, m in model.named_modules():
        kind = kind_of(m)
        if kind is None or id(m) in seen:
            continue
        seen.add(id(m))
        pattern = next((p for p in cfg.skip if fnmatch.fnmatchcase(name, p)), None)
        why = (f"kept in float: matches skip pattern {pattern!r}" if pattern is not None
               else _why_float(model, m, kind, cfg, parents))
        if why is None:
            found[name] = m
            continue
        rec.skip(name, why)
        if pattern is not None:
            layers[name] = LayerRecipe(kind, "fp32", reason=why)
    return found


def float_parts(m: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight (out, in, ...) and bias of a float Linear/Conv (BatchNorm folded if it was)."""
    if isinstance(m, _Fused):
        w, b = m._folded_dense()
        return (w.t() if isinstance(m, FusedConv1DLinear) else w), b
    w = m.weight.detach()
    return (w.t() if is_hf_conv1d(m) else w), (None if m.bias is None else m.bias.detach())


def int8_module(m: nn.Module, act, cfg: QuantConfig, qmax: int, input_shape,
                smooth: Optional[torch.Tensor] = None) -> nn.Module:
    kind = kind_of(m)
    if kind == "rnn":
        return int8_rnn(m, cfg.weight_granularity == "per_channel")
    if kind == "embedding_bag":
        return Int8EmbeddingBag(m)
    if kind == "embedding":
        return Int8Embedding(m)
    w, b = float_parts(m)
    per_channel = cfg.weight_granularity == "per_channel"
    if kind == "linear":
        return Int8Linear(w, b, act, qmax, per_channel, smooth=smooth)
    padding = m.padding if isinstance(m, FusedConv) else _conv_padding(m)
    return Int8Conv(w, b, act, m.stride, padding, m.dilation, m.groups, qmax, per_channel,
                    input_shape=input_shape)


class Bf16Layer(nn.Module):
    """A Linear/Conv kept in bf16 inside an int8 model (a bf16 fallback): its input is cast to
    bf16 and its output back to the input's dtype, so the layers around it see what they saw."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.bfloat16)).to(x.dtype)

    def refold(self) -> None:
        """Called when a BatchNorm folded into this layer loads new statistics."""
        raise RuntimeError("a bf16 fallback layer holds weights with its BatchNorm folded in; "
                           "load new weights into the float model and quantize it again.")


def bf16_module(m: nn.Module) -> Bf16Layer:
    """A bf16 copy of a float Linear/Conv (BatchNorm folded in if it was)."""
    w, b = float_parts(m)
    if kind_of(m) == "linear":
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        padding = m.padding if isinstance(m, FusedConv) else _conv_padding(m)
        new = _CONVS[w.dim() - 3](w.shape[1] * m.groups, w.shape[0], tuple(w.shape[2:]),
                                  m.stride, padding, m.dilation, m.groups, bias=b is not None)
    new.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
    if b is not None:
        new.bias = nn.Parameter(b.detach().to(torch.bfloat16), requires_grad=False)
    return Bf16Layer(new.eval())


def int8_rnn(m: nn.Module, per_channel: bool) -> nn.Module:
    """torch's dynamic int8 LSTM/GRU (int8 weights, each step's input quantized as it comes)."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
    cls = nnqd.LSTM if isinstance(m, nn.LSTM) else nnqd.GRU
    m.qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    try:
        return cls.from_float(m)
    finally:
        del m.qconfig


__all__ = ["Bf16Layer", "TABLES", "WEIGHT_ONLY", "bf16_module", "float_parts", "int8_module", "int8_rnn", "kind_of",
           "targets"]
