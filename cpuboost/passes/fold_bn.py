"""Fold an inference BatchNorm into the Conv / ConvTranspose / Linear that feeds it.

Pairs come from the recorded dataflow (what ran), so folding works through custom methods and
Python control flow. A pair folds only where the BatchNorm is the sole user of the producer's
output, each module ran exactly once, and nobody hooks either of them.
"""
from __future__ import annotations

from torch import nn

from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.folded import fold_into
from cpuboost.passes._context import PassContext, has_user_hooks
from cpuboost.passes.prepack import module_parents, to_fused, why_not_packable

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _why_not(model, parents, bn, bn_call, producer_call, ctx) -> str | None:
    flow = ctx.flow
    if type(bn) not in _BN:
        return f"{type(bn).__name__} is a BatchNorm subclass with its own behaviour"
    if bn.running_mean is None or not bn.track_running_stats:
        return "BatchNorm has no running statistics (it normalizes each batch)"
    if producer_call is None:
        return "its input is not the output of a conv/linear module"
    producer = producer_call.module
    is_conv = isinstance(producer, _CONV)
    if not (is_conv or type(producer) is nn.Linear):
        return f"its input comes from {type(producer).__name__}, not a conv/linear"
    wanted = ctx.config.conv_bn_folding if is_conv else ctx.config.linear_bn_folding
    if not wanted:
        return "disabled by " + ("conv_bn_folding" if is_conv else "linear_bn_folding")
    if not is_conv and producer_call.out_ndim != 2:
        return "linear output is not (N, C), so BatchNorm1d does not act on its features"
    if flow.sole_consumer(producer_call.out_key) is not bn_call:
        return f"{producer_call.name}'s output is also used elsewhere"
    if len(flow.calls_of(producer)) != 1 or len(flow.calls_of(bn)) != 1:
        return "a module of the pair runs more than once per call"
    if has_user_hooks(producer) or has_user_hooks(bn):
        return "a module of the pair has forward hooks that observe its own output"
    unsupported = why_not_packable(model, producer, parents)
    if unsupported:
        return f"{producer_call.name} cannot become a fused module: {unsupported}"
    scale = bn.weight.detach() if bn.weight is not None else None
    if scale is not None and bool((scale == 0).any()):
        return "a BatchNorm weight is exactly 0, so folding could not be undone for state_dict"
    return None


def fold_bn(model: nn.Module, ctx: PassContext) -> nn.Module:
    flow = ctx.flow
    parents = module_parents(model)
    for bn_call in list(flow.calls):
        bn = bn_call.module
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or isinstance(bn, FoldedBatchNorm):
            continue
        producer_call = flow.producer(bn_call.in_keys[0]) if bn_call.in_keys else None
        reason = _why_not(model, parents, bn, bn_call, producer_call, ctx)
        if reason:
            ctx.record.skip(bn_call.name, reason)
            continue
        fused = to_fused(model, producer_call.module, ctx, backend="aten")
        fused.fold(fold_into(bn, fused))
        ctx.record.apply(f"{producer_call.name} <- {bn_call.name}")
    return model
