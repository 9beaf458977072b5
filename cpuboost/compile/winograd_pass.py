"""Compiled graphs: oneDNN 3x3 convolutions moved onto cpuboost's Winograd kernel.

A post-grad pass (after freezing made the weights constants and Inductor's own fusions turned
convolutions into ``mkldnn._convolution_pointwise``, with a fused activation and, in the binary
form, a fused residual add): where the convolution qualifies and the kernel pays for its shape
(``passes.winograd``), the call becomes ``cpuboost::conv3x3_winograd`` on a weight transformed
once, and the oneDNN weight is dropped when nothing else reads it. The transformed weight does
not depend on the batch, so a dynamic batch keeps it too. The in-place binary form
(``_convolution_pointwise_.binary``) is left to oneDNN.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.fx.experimental.symbolic_shapes import has_free_symbols

from cpuboost.compile.conv_pack import _hinted
from cpuboost.compile.shared_constants import made_once
from cpuboost.kernels import winograd_pack
from cpuboost.passes.winograd import use_winograd

_M = torch.ops.mkldnn
# oneDNN post-op (attr, algorithm) -> the kernel's activation code (cpuboost.kernels.AVX2_ACTS)
_ACTS = {("none", ""): 0, ("relu", ""): 1, ("gelu", "none"): 2, ("gelu", "tanh"): 3,
         ("tanh", ""): 4, ("sigmoid", ""): 5, ("swish", ""): 6, ("hardswish", ""): 7}


def _act(attr, scalars, algorithm) -> Optional[int]:
    if scalars:  # leaky_relu, hardtanh...: a parameterised post-op the kernel has not
        return None
    return _ACTS.get((attr or "none", algorithm or ("none" if attr == "gelu" else "")))


def _parts(node):
    """(x, add, weight, bias, conv params, activation code) of a oneDNN convolution node the
    kernel could take, or None."""
    if node.target is _M._convolution_pointwise.default:
        x, w, b, padding, stride, dilation, groups, attr, scalars, algo = node.args
        add = None
    elif node.target is _M._convolution_pointwise.binary:
        (x, add, w, b, padding, stride, dilation, groups, binary, alpha, attr, scalars,
         algo) = node.args
        if binary != "add" or alpha not in (None, 1, 1.0):
            return None
    else:
        return None
    act = _act(attr, scalars, algo)
    return None if act is None else (x, add, w, b, (padding, stride, dilation, groups), act)


def winograd_convolutions(graph: torch.fx.Graph) -> int:
    """Rewrite the qualifying oneDNN convolutions of ``graph``; returns how many."""
    gm = graph.owning_module
    moved = 0
    for node in list(graph.nodes):
        parts = _parts(node) if node.op == "call_function" else None
        if parts is None:
            continue
        x, add, w, b, (padding, stride, dilation, groups), act = parts
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            continue
        weight = getattr(gm, w.target, None)
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        out = node.meta.get("val")
        if not isinstance(weight, torch.Tensor) or val is None or out is None or \
                val.dim() != 4 or weight.dim() != 4:
            continue
        size = _hinted(val.shape)  # a dynamic batch: the size traced with
        if size is None or has_free_symbols(val.shape[1:]) or \
                not out.is_contiguous(memory_format=torch.channels_last):
            continue  # a dynamic image size (the choice needs it), or not the kernel's layout
        oc, c = weight.shape[:2]
        if not use_winograd(tuple(weight.shape[2:]), stride, dilation, groups, padding, c, oc,
                            val.dtype, size):
            continue

        def transform(weight=weight):  # once per weight, whatever the number of graphs
            return winograd_pack(weight.to_dense() if weight.is_mkldnn else weight)

        name = f"_cpuboost_winograd_w{moved}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, made_once(("winograd",), weight, transform), persistent=False)
        with graph.inserting_before(node):
            packed = graph.get_attr(name)
            new = graph.call_function(torch.ops.cpuboost.conv3x3_winograd.default,
                                      (x, packed, b, add, oc, list(padding), act))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if not w.users:  # oneDNN's copy of the weight: dropped once nothing reads it
            graph.erase_node(w)
            if hasattr(gm, w.target):
                delattr(gm, w.target)
        moved += 1
    return moved
