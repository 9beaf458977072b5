"""Hold Embedding and EmbeddingBag tables for inference.

bf16/fp16: the table is held in that dtype. Measured here: DLRM-like bs256 bf16 1.70 -> 1.60 ms
(tables are read from DRAM, half the bytes per row) and half the memory. fp32: the table is held
as a plain tensor sharing the original storage, so torch takes its forward-only kernel.

Outputs keep the original dtype, except where the recorded dataflow shows every consumer rounds
them to the compute dtype anyway (a packed bf16 module, directly or through ``cat``/``stack``):
then the lookup returns that dtype and skips a conversion there and back, with identical values.
"""
from __future__ import annotations

import torch
from torch import nn

from cpuboost.nn.embedding import HeldEmbedding, HeldEmbeddingBag
from cpuboost.nn.fused import FusedLinear, _Fused
from cpuboost.passes._context import PassContext, has_user_hooks, replace_module
from cpuboost.passes._dataflow import Dataflow, ModuleCall, OpCall
from cpuboost.passes.prepack import tied_weight_owner

_JOINS = ("cat", "stack", "concat", "concatenate")  # result dtype: the widest input's


def _why_not(model, m, tie_allowed: bool = False) -> str | None:
    if m.max_norm is not None:
        return "max_norm renormalizes the table in place on every lookup"
    if has_user_hooks(m):
        return "has forward hooks"
    if not m.weight.dtype.is_floating_point or m.weight.dtype.itemsize < 4:
        return f"table is already {m.weight.dtype}"
    owner = None if tie_allowed else tied_weight_owner(model, m)
    if owner is not None:
        return f"its weight is tied to {owner or 'the root'}"
    return None


def _rounds_to(ent, dtype: torch.dtype) -> bool:
    """A packed module computing in ``dtype``: it casts whatever it receives to ``dtype``."""
    return (isinstance(ent, ModuleCall) and isinstance(ent.module, _Fused)
            and ent.module.compute_dtype == dtype)


def _only_rounded(flow: Dataflow, key, dtype: torch.dtype) -> bool:
    users = flow.real_consumers(key)
    if not users:
        return False
    for user in users:
        if isinstance(user, OpCall) and user.name in _JOINS:
            after = flow.real_consumers(user.out_key)
            if not after or not all(_rounds_to(a, dtype) for a in after):
                return False
        elif not _rounds_to(user, dtype):
            return False
    return True


def _tied_head(model: nn.Module, m: nn.Module, dtype: torch.dtype):
    """(name, Linear) when ``m``'s table is tied to exactly one plain Linear (an LM head) and
    the compute dtype is low: both can then read one low-precision copy of the matrix."""
    if dtype == torch.float32 or type(m) is not nn.Embedding or m.max_norm is not None:
        return None
    users = [(n, o) for n, o in model.named_modules()
             if o is not m and any(p is m.weight for p in o.parameters(recurse=False))]
    if len(users) != 1 or type(users[0][1]) is not nn.Linear or has_user_hooks(users[0][1]):
        return None
    return users[0]


def _share_with_head(model, ctx, m, new, head) -> None:
    """The head becomes a FusedLinear on aten kernels whose weight *is* the held table: one
    bf16 copy instead of the fp32 matrix that autocast re-cast on every call (GPT-2's lm_head
    is 38.6M parameters)."""
    head_name, linear = head
    fused = FusedLinear(linear, ctx.config.compute_dtype, backend="aten")
    fused._w = new._w
    replace_module(model, linear, fused)
    if ctx.flow is not None:
        ctx.flow.rebind(linear, fused)
    ctx.record.apply(f"{head_name}: reads the same {ctx.config.compute_dtype} table (tied weight)")


def embedding_tables(model: nn.Module, ctx: PassContext) -> nn.Module:
    dtype = ctx.config.compute_dtype
    for name, m in list(model.named_modules()):
        kind = {nn.Embedding: HeldEmbedding, nn.EmbeddingBag: HeldEmbeddingBag}.get(type(m))
        if kind is None:
            continue
        head = _tied_head(model, m, dtype)
        reason = _why_not(model, m, tie_allowed=head is not None)
        if reason:
            ctx.record.skip(name, reason)
            continue
        new = kind(m, dtype)
        if head:
            _share_with_head(model, ctx, m, new, head)
        calls = ctx.flow.calls_of(m) if ctx.flow is not None else []
        narrow = dtype != new.orig_dtype and bool(calls) and all(
            _only_rounded(ctx.flow, c.out_key, dtype) for c in calls)
        if narrow:
            new.out_dtype = dtype
        replace_module(model, m, new)
        if ctx.flow is not None:
            ctx.flow.rebind(m, new)
        what = f"table held in {dtype}" if dtype != new.orig_dtype else "table held without grad (forward-only kernel)"
        ctx.record.apply(f"{name}: {what}" + (f", returns {dtype} (all its users cast to it)" if narrow else ""))
    return model
