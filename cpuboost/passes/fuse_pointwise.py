"""Run an activation inside the oneDNN call of the conv/linear (float or int8) that feeds it.

Chosen from the recorded dataflow: the activation module must be the only user of the packed
module's output (looking through a folded BatchNorm), and every call of that activation module
must be fusable, since it is then replaced by the identity.
"""
from __future__ import annotations

import functools
import time

import torch
from torch import nn

from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.fused import _Fused
from cpuboost.nn.int8 import _Int8
from cpuboost.nn.postops import POST_OPS, PostOp, identify
from cpuboost.passes._context import PassContext, has_user_hooks, replace_module
from cpuboost.passes._dataflow import ModuleCall


class FusedAway(nn.Identity):
    """Where an activation was; its work now happens inside ``fused_into``."""

    def __init__(self, what: str, fused_into: list[str]):
        super().__init__()
        self.what, self.fused_into = what, fused_into

    def extra_repr(self) -> str:
        return f"{self.what} fused into {', '.join(self.fused_into)}"


@functools.lru_cache(maxsize=None)
def post_op_costs(name: str, dtype: torch.dtype, threads: int) -> tuple[float, float]:
    """Seconds per call of oneDNN's linear with the post-op ``name`` fused, and of the same
    linear followed by the activation as its own op, measured once per process on this CPU
    (128 x 768 -> 1024, a BERT-base shape: on AVX2 the fused post-op's extra cost grew with K;
    at K = 64 fused and apart cost the same). oneDNN applies post-ops with one element-wise
    code generator for linear and conv alike. Measured on an AVX2 Zen 3 at 128 x 768 -> 3072:
    GELU fused +1.61 ms vs +0.45 ms as its own op, SiLU +1.77 vs +0.49, tanh +2.50 vs +0.86;
    ReLU, sigmoid and hardswish cheaper fused."""
    op = POST_OPS[name]
    x = torch.randn(128, 768).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1024, 768).to(dtype), 128)
    linear = torch.ops.mkldnn._linear_pointwise.default
    fused = lambda: linear(x, packed, None, op.attr, list(op.scalars), op.algorithm or "none")  # noqa: E731
    apart = lambda: op.reference(linear(x, packed, None, "none", [], ""))  # noqa: E731
    best = [float("inf"), float("inf")]
    for _ in range(9):  # interleaved, best of 9: the machine's noise hits both alike
        for i, run in enumerate((fused, apart)):
            t0 = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def fusing_pays(op: PostOp, dtype: torch.dtype) -> bool:
    """Fused unless the fused call measured more than 5% slower than linear + activation."""
    if op.name in ("none", "relu"):
        return True
    fused, apart = post_op_costs(op.name, dtype, torch.get_num_threads())
    return fused <= 1.05 * apart


def _takes_post_op(m: nn.Module) -> bool:
    return ((isinstance(m, _Fused) and m.backend in ("onednn", "avx2", "winograd"))
            or isinstance(m, _Int8))


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
        elif isinstance(call.module, _Fused) and call.module.backend == "onednn" and \
                not fusing_pays(op, call.module.compute_dtype):
            fused, apart = post_op_costs(op.name, call.module.compute_dtype,
                                         torch.get_num_threads())
            blocked[id(act)] = (f"oneDNN's fused {op.name} measured slower on this CPU than "
                                f"running it apart ({fused * 1e6:.0f} vs {apart * 1e6:.0f} us "
                                "on a 128x1024 output)")
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
