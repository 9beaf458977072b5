"""int8 layer -> int8 layer hand-off, and siblings sharing one quantized input.

Hand-off: where a static int8 layer's output is used only by
another one (through identities: a fused activation, a folded BatchNorm, an eval Dropout), the
first writes uint8 with the second's input scale, and the second skips quantizing. That saves a
float write and read plus a quantize pass per hand-off (conv1 -> conv2 -> conv3 in a ResNet
bottleneck, Linear -> Linear in an MLP).

Chosen from the recorded dataflow, like the other fusions: the producer must run once per call
and hand its output to exactly one consumer, which takes it as its first argument.

Shared input (``share_inputs``): static int8 linears that read the same float tensor with the
same input qparams (an attention's Q, K and V projections) quantize it once per call instead of
once each (``nn.int8.SharedInput``): BERT-base int8 quantized 5 tensors per layer, now 3.
"""
from __future__ import annotations

from torch import nn

from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.int8 import Int8Linear, _Int8, share_input
from cpuboost.passes._context import has_user_hooks
from cpuboost.passes._dataflow import Dataflow, ModuleCall
from cpuboost.passes.fuse_pointwise import FusedAway
from cpuboost.passes.remove_dropout import DropoutIdentity
from cpuboost.report import PassRecord

_IDENTITIES = (FusedAway, FoldedBatchNorm, DropoutIdentity, nn.Identity, nn.Dropout)


def consumer(flow: Dataflow, key):
    """(the module call or op that finally uses ``key``, the key it reads), hopping over
    identity modules (a fused activation, a folded BatchNorm, an eval Dropout)."""
    nxt = flow.sole_consumer(key)
    while isinstance(nxt, ModuleCall) and isinstance(nxt.module, _IDENTITIES):
        key = nxt.out_key
        nxt = flow.sole_consumer(key)
    return nxt, key


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def hand_off(model: nn.Module, flow: Dataflow, rec: PassRecord) -> None:
    names = _names(model)
    for call in flow.calls:
        a = call.module
        if not isinstance(a, _Int8) or call.index in flow.absorbed or has_user_hooks(a):
            continue
        nxt, key = consumer(flow, call.out_key)
        if not isinstance(nxt, ModuleCall) or not isinstance(nxt.module, _Int8):
            continue
        b = nxt.module
        if (b.dynamic or b.qmax != 255 or b.smooth is not None or has_user_hooks(b)
                or len(flow.calls_of(a)) != 1 or not nxt.in_keys or nxt.in_keys[0] != key):
            continue
        a.out_q = (b.x_scale, b.x_zp)
        rec.apply(f"{names.get(id(a), call.name)} -> {names.get(id(b), nxt.name)}")


def share_inputs(model: nn.Module, flow: Dataflow, rec: PassRecord) -> None:
    names = _names(model)
    groups: dict[tuple, list] = {}
    for call in flow.calls:
        m = call.module
        if (not isinstance(m, Int8Linear) or m.dynamic or m.smooth is not None or not call.in_keys
                or call.index in flow.absorbed or has_user_hooks(m)
                or len(flow.calls_of(m)) != 1):
            continue
        groups.setdefault((call.in_keys[0], m.x_scale, m.x_zp, m.qmax), []).append(m)
    for group, members in enumerate(g for g in groups.values() if len(g) > 1):
        share_input(members, group)
        rec.apply(", ".join(names.get(id(m), "?") for m in members) +
                  " quantize their common input once")


__all__ = ["consumer", "hand_off", "share_inputs"]
