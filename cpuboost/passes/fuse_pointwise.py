"""Run an activation inside the oneDNN call of the conv/linear (float or int8) that feeds it.

Chosen from the recorded dataflow: the activation module must be the only user of the packed
module's output (looking through a folded BatchNorm), and every call of that activation module
must be fusable, since it is then replaced by the identity.
"""
from __future__ import annotations

from torch import nn

from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.fused import _Fused
from cpuboost.nn.int8 import _Int8
from cpuboost.nn.postops import identify
from cpuboost.passes._context import PassContext, has_user_hooks, replace_module
from cpuboost.passes._dataflow import ModuleCall


class FusedAway(nn.Identity):
    """Where an activation was; its work now happens inside ``fused_into``."""

    def __init__(self, what: str, fused_into: list[str]):
        super().__init__()
        self.what, self.fused_into = what, fused_into

    def extra_repr(self) -> str:
        return f"{self.what} fused into {', '.join(self.fused_into)}"


def _takes_post_op(m: nn.Module) -> bool:
    return (isinstance(m, _Fused) and m.backend == "onednn") or isinstance(m, _Int8)


def _activation_after(flow, call):
    """Follow ``call``'s output through folded BatchNorms to its sole consumer."""
    out = call.out_key
    nxt = flow.sole_consumer(out)
    while isinstance(nxt, ModuleCall) and isinstance(nxt.module, FoldedBatchNorm):
        out = nxt.out_key
        nxt = flow.sole_consumer(out)
    return nxt if isinstance(nxt, ModuleCall) else None


def fuse_pointwise(model: nn.Module, ctx: PassContext) -> nn.Module:
    flow = ctx.flow
    plans: dict[int, tuple] = {}  # id(activation) -> (activation, post_op, [(name, fused)])
    blocked: dict[int, str] = {}
    for call in flow.calls:
        if call.index in flow.absorbed:
            continue
        act_call = None
        if _takes_post_op(call.module):
            act_call = _activation_after(flow, call)
        if act_call is None or isinstance(act_call.module, (_Fused, _Int8, FoldedBatchNorm)):
            continue
        act = act_call.module
        op = identify(act)
        if op is None:
            continue
        accepts = getattr(call.module, "accepts", None)
        if accepts is not None and not accepts(op):
            blocked[id(act)] = f"{call.name}'s kernel has no {op.name} post-op"
        elif call.module.post_op.name != "none" or len(flow.calls_of(call.module)) != 1:
            blocked[id(act)] = f"{call.name} runs more than once or is already fused"
        elif has_user_hooks(act):
            blocked[id(act)] = "has forward hooks, which would stop firing"
        elif has_user_hooks(call.module):
            blocked[id(act)] = f"{call.name} has forward hooks that observe its pre-activation output"
        plans.setdefault(id(act), (act, op, act_call.name, []))[3].append((call.name, call.module))
    for key, (act, op, act_name, producers) in plans.items():
        reason = blocked.get(key)
        if reason is None and len(producers) != len(flow.calls_of(act)):
            reason = "this module is also called on tensors no packed conv/linear produced"
        if reason:
            ctx.record.skip(act_name, f"{op.name} not fused: {reason}")
            continue
        for _, fused in producers:
            fused.post_op = op
        away = FusedAway(op.name, [n for n, _ in producers])
        replace_module(model, act, away)
        flow.rebind(act, away)  # its calls now pass their input through
        ctx.record.apply(f"{' + '.join(n for n, _ in producers)} + {act_name} ({op.name})")
    return model
