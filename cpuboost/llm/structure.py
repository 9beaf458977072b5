"""What a causal LM is made of, found by module type and structure (never by model name).

An attention block is a module whose Linear children project to queries, keys and values
(separately, or in one fused projection) plus an output projection; an MLP has an up (and
maybe gate) projection and a down projection; a rotary embedding holds an ``inv_freq`` buffer;
norms are LayerNorm or an RMS norm (a module with a 1-D ``weight`` and an epsilon whose output
matches ``x / rms(x) * weight``). The child names below are the conventions transformers' model
families use for those roles; a model that names them otherwise still gets every rewrite that
does not depend on the role (weight-only quantization, packing, the KV cache).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cpuboost.nn.fused import is_hf_conv1d

QKV_SEPARATE = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
QKV_FUSED = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
ATTN_OUT = ("o_proj", "out_proj", "dense", "c_proj")
MLP_GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
MLP_FUSED_GATE = (("gate_up_proj", "down_proj"),)
MLP_PLAIN = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"),
             ("up_proj", "down_proj"))


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_hf_conv1d(m)


def is_projection(m: nn.Module) -> bool:
    """A linear layer: float, or one cpuboost already replaced (packed or quantized)."""
    from cpuboost.nn.fused import FusedLinear
    from cpuboost.nn.woq import WoqLinear
    return is_linear(m) or isinstance(m, (FusedLinear, WoqLinear))


def _linear_children(m: nn.Module) -> set[str]:
    return {name for name, c in m.named_children() if is_projection(c)}


def attention_kind(m: nn.Module) -> str | None:
    kids = _linear_children(m)
    if not kids & set(ATTN_OUT):
        return None
    if any(set(g) <= kids for g in QKV_SEPARATE):
        return "separate q/k/v projections"
    if kids & set(QKV_FUSED):
        return "fused qkv projection"
    return None


def mlp_kind(m: nn.Module) -> str | None:
    kids = _linear_children(m)
    if any(set(g) <= kids for g in MLP_GATED):
        return "gated"
    if any(set(g) <= kids for g in MLP_FUSED_GATE):
        return "gated (fused gate/up)"
    if attention_kind(m) is None and any(set(g) <= kids for g in MLP_PLAIN):
        return "plain"
    return None


def is_rms_norm(m: nn.Module) -> bool:
    """A module with a 1-D weight and an epsilon that computes an RMS norm (checked by
    running it on a probe input, so a look-alike with another formula is not taken)."""
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if isinstance(m, nn.LayerNorm) or not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    if not isinstance(eps, float) or list(m.children()):
        return False
    x = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.dtype)
    try:
        with torch.no_grad():
            got = m(x)
    except Exception:  # noqa: BLE001 - a module we cannot probe is simply not recognised
        return False
    want = F.rms_norm(x.float(), (w.shape[0],), w.float(), eps)
    return isinstance(got, torch.Tensor) and torch.allclose(got.float(), want, rtol=2e-2,
                                                             atol=2e-2)


@dataclass
class Structure:
    attention: Counter = field(default_factory=Counter)
    mlp: Counter = field(default_factory=Counter)
    norms: Counter = field(default_factory=Counter)
    rotary: int = 0
    linears: int = 0

    def lines(self) -> list[str]:
        def fmt(c: Counter) -> str:
            return ", ".join(f"{n} {k}" for k, n in c.items()) or "none found"
        return [f"attention: {fmt(self.attention)}", f"mlp: {fmt(self.mlp)}",
                f"norms: {fmt(self.norms)}", f"rotary embeddings: {self.rotary}",
                f"linear layers: {self.linears}"]


def structure_of(model: nn.Module) -> Structure:
    s = Structure()
    for m in model.modules():
        kind = attention_kind(m)
        if kind:
            s.attention[kind] += 1
        kind = mlp_kind(m)
        if kind:
            s.mlp[kind] += 1
        if isinstance(m, nn.LayerNorm):
            s.norms["LayerNorm"] += 1
        elif is_rms_norm(m):
            s.norms["RMSNorm"] += 1
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor):
            s.rotary += 1
        s.linears += is_projection(m)
    return s
