"""conv + residual add (+relu) as one oneDNN call (``_convolution_pointwise.binary``).

Eager PyTorch computes ``y = conv(x); y += r; relu(y)`` inside some block's forward, so fusing
means changing that block's forward. The recorded dataflow picks the sites (the add is the only
user of the conv's output, through folded BatchNorms and identities); only the block that runs
the add is then traced with torch.fx, its children kept as calls, and the rewritten graph becomes
that block's ``forward`` (an instance attribute: class, attributes and hooks of the block stay).
A block that does not trace, or whose inner modules carry hooks, is left alone and reported.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from cpuboost.nn import FoldedBatchNorm, FusedConv
from cpuboost.nn.fused import _Fused
from cpuboost.nn.postops import POST_OPS, identify
from cpuboost.passes._context import PassContext, has_user_hooks
from cpuboost.passes._dataflow import Dataflow, ModuleCall
from cpuboost.passes.remove_dropout import DropoutIdentity

_ADD_OPS = {"add", "__add__", "__radd__", "__iadd__", "add_"}
_INPLACE = {"__iadd__", "add_"}
_FX_ADDS = {operator.add, operator.iadd, torch.add}
_PASSTHROUGH = (FoldedBatchNorm, nn.Identity, DropoutIdentity)
_RELU_FNS = {F.relu, torch.relu}


def _conv_behind(flow: Dataflow, key, consumer):
    """The packed conv whose output reaches ``consumer`` as ``key``, each hop its sole user."""
    if flow.sole_consumer(key) is not consumer:
        return None
    call = flow.producer(key)
    while isinstance(call, ModuleCall) and isinstance(call.module, FoldedBatchNorm):
        prev = call.in_keys[0]
        if flow.sole_consumer(prev) is not call:
            return None
        call = flow.producer(prev)
    ok = (isinstance(call, ModuleCall) and isinstance(call.module, FusedConv)
          and call.module.backend in ("onednn", "winograd") and call.module.post_op.name == "none"
          and len(flow.calls_of(call.module)) == 1 and not has_user_hooks(call.module))
    return call if ok else None


def _sites(flow: Dataflow) -> dict[str, list]:
    """owner block name -> [(conv module, relu call after the add or None)] from the adds."""
    sites: dict[str, list] = {}
    for op in flow.ops:
        if op.name not in _ADD_OPS or not op.plain_args or len(op.in_keys) != 2:
            continue
        if len(set(op.in_shapes)) != 1:  # broadcast (ConvBERT adds a (C, 1) bias): the fused
            continue  # kernels take an added tensor of the output's own shape only
        sides = [0] if op.name in _INPLACE else [0, 1]  # in place: only into the conv output
        conv = next((c for i in sides if (c := _conv_behind(flow, op.in_keys[i], op))), None)
        if conv is None:
            continue
        after = flow.sole_consumer(op.out_key)
        relu = (isinstance(after, ModuleCall) and not has_user_hooks(after.module)
                and identify(after.module) is POST_OPS["relu"])
        sites.setdefault(op.owner, []).append((conv.module, after if relu else None))
    return sites


class _BlockTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(m.children(), None) is None or isinstance(m, _Fused)


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _rewrite(graph: fx.Graph, block: nn.Module, conv: nn.Module, relu: bool) -> str | None:
    """Rewrite conv -> passthroughs -> add(other) [-> relu] into conv(x, add=other).
    Returns what was fused ("add" / "add + relu"), or None if the graph did not match."""
    def module_of(node):
        return block.get_submodule(node.target) if node.op == "call_module" else None

    conv_node = next((n for n in graph.nodes if module_of(n) is conv), None)
    if conv_node is None or len(conv_node.args) != 1 or conv_node.kwargs:
        return None
    chain, node = [conv_node], _single_user(conv_node)
    while node is not None and isinstance(module_of(node), _PASSTHROUGH):
        chain.append(node)
        node = _single_user(node)
    is_add = node is not None and ((node.op == "call_function" and node.target in _FX_ADDS)
                                   or (node.op == "call_method" and node.target in ("add", "add_")))
    if not is_add or node.kwargs or len(node.args) != 2 or chain[-1] not in node.args:
        return None
    other = node.args[1] if node.args[0] is chain[-1] else node.args[0]
    last, act = node, _single_user(node)
    fuse_relu = relu and act is not None and (
        isinstance(module_of(act), nn.ReLU) or (act.op == "call_function" and act.target in _RELU_FNS
                                                and len(act.args) == 1 and not act.kwargs))
    with graph.inserting_before(node):
        fused = graph.call_module(conv_node.target, (conv_node.args[0],), {"add": other})
    if fuse_relu:
        last = act
        conv.post_op = POST_OPS["relu"]
    last.replace_all_uses_with(fused)
    for dead in ([act] if fuse_relu else []) + [node] + chain[::-1]:
        graph.erase_node(dead)
    return "add + relu" if fuse_relu else "add"


def fuse_add(model: nn.Module, ctx: PassContext) -> nn.Module:
    for owner, convs in _sites(ctx.flow).items():
        block = model.get_submodule(owner) if owner else model
        hooked = [n for n, m in block.named_modules() if m is not block and has_user_hooks(m)
                  and (next(m.children(), None) is not None or isinstance(m, _PASSTHROUGH))]
        if hooked:
            ctx.record.skip(owner or "<root>", f"inner module {hooked[0]!r} has hooks that "
                            "a rewritten forward would not call")
            continue
        try:
            graph = _BlockTracer().trace(block)
        except Exception as e:  # control flow on data etc.: that block keeps its forward
            ctx.record.skip(owner or "<root>", f"its forward does not trace ({type(e).__name__}: "
                            f"{str(e)[:80]})")
            continue
        done = []
        for conv, relu_call in convs:
            what = _rewrite(graph, block, conv, relu_call is not None)
            if what:
                done.append((conv, what))
                if what.endswith("relu"):  # that activation call no longer happens
                    ctx.flow.absorbed.add(relu_call.index)
        if not done:
            ctx.record.skip(owner or "<root>", "the add did not match conv -> add in its forward")
            continue
        graph.lint()
        gm = fx.GraphModule(block, graph)
        # Resolve submodules through the block's own registry, so a module swapped in the block
        # later (by a pass or the user) is the one the rewritten forward calls.
        gm.__dict__["_modules"] = block._modules
        block.__dict__["forward"] = gm.forward
        names = {id(m): n for n, m in block.named_modules()}
        for conv, what in done:
            ctx.record.apply(f"{owner or '<root>'}: {names.get(id(conv), '?')} + {what}")
    return model


__all__ = ["fuse_add"]
