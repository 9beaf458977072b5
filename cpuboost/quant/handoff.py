"""int8 layer -> int8 layer hand-off, and siblings sharing one quantized input.

Hand-off: where a static int8 layer's output is used only by
another one (through identities: a fused activation, a folded BatchNorm, an eval Dropout), the
first writes uint8 with the second's input scale, and the second skips quantizing. That saves a
float write and read plus a quantize pass per hand-off (conv1 -> conv2 -> conv3 in a ResNet
bottleneck, Linear -> Linear in an MLP).

Chosen from the recorded dataflow, like the other fusions: the producer must run once per call
and hand its output to exactly one consumer, which takes it as its first argument. The dataflow
is recorded with float tensors, so code that looks at the tensor between the two layers does
not show in it: T5's feed-forward casts its activation to ``wo.weight.dtype`` when the dtypes
differ, which a float recording never does and a uint8 hand-off always did, turning the codes
into floats (output cosine vs fp32 0.64). So the hand-offs are then checked on the first input:
the model's output with them must match its output without them (the same quantization, done
by the producer instead of the consumer); where it does not, each is tried alone and those that
change the output stay float.

Shared input (``share_inputs``): static int8 linears that read the same float tensor with the
same input qparams (an attention's Q, K and V projections) quantize it once per call instead of
once each (``nn.int8_shared.SharedInput``): BERT-base int8 quantized 5 tensors per layer, now 3.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.int8 import Int8Linear, _Int8
from cpuboost.nn.int8_shared import share_input
from cpuboost.passes._context import has_user_hooks
from cpuboost.passes._dataflow import Dataflow, ModuleCall
from cpuboost.passes.fuse_pointwise import FusedAway
from cpuboost.passes.remove_dropout import DropoutIdentity
from cpuboost.report import PassRecord
from cpuboost.verify import sqnr_db

_IDENTITIES = (FusedAway, FoldedBatchNorm, DropoutIdentity, nn.Identity, nn.Dropout)
# the model's output with the hand-offs vs without, on the first input. The same values rounded
# in another place: bit-identical (BERT, the toy models, tiny HF ResNet and ConvNeXt), or 39.0 dB
# on ResNet-50, where one oneDNN 3x3 conv rounds its own uint8 output differently; T5's cast of
# the codes to float: 1.7 dB
SAME_OUTPUT_DB = 25.0


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


def hand_off(model: nn.Module, flow: Dataflow, rec: PassRecord,
             run: Optional[Callable[[], object]] = None) -> None:
    """Set ``out_q`` where an int8 layer can hand its output to the next as uint8; with ``run``
    (the model on its first input) only where the model's output stays the same."""
    names = _names(model)
    chosen = []
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
        chosen.append((a, (b.x_scale, b.x_zp),
                       f"{names.get(id(a), call.name)} -> {names.get(id(b), nxt.name)}"))
    if run is not None and chosen:
        chosen = _same_output(chosen, run, rec)
    for a, qparams, text in chosen:
        a.out_q = qparams
        rec.apply(text)


def _same_output(chosen: list, run: Callable[[], object], rec: PassRecord) -> list:
    """The hand-offs of ``chosen`` that leave the model's output as it is without them."""
    def moved(subset) -> float:  # SQNR of the output with ``subset`` handed off
        for a, qparams, _ in subset:
            a.out_q = qparams
        try:
            return sqnr_db(reference, run())
        finally:
            for a, _, _ in subset:
                a.out_q = None
    reference = run()
    if moved(chosen) >= SAME_OUTPUT_DB:
        return chosen
    kept = []
    for item in chosen:
        db = moved([item])
        if db >= SAME_OUTPUT_DB:
            kept.append(item)
        else:
            rec.skip(item[2], f"handed over as uint8 the model's output moved (SQNR {db:.1f} dB "
                              "against the float hand-over): its code uses the tensor between "
                              "the two layers (a dtype check or cast), so it stays float")
    if kept and moved(kept) < SAME_OUTPUT_DB:  # fine alone, not together: none
        for _, _, text in kept:
            rec.skip(text, "the hand-offs that were each fine alone moved the output together")
        kept = []
    return kept


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
