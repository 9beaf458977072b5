"""Convolution weights packed for oneDNN when the input shape is dynamic.

With freezing, Inductor packs a convolution's weight for oneDNN once, at compile time, but only
when the input's shape is static. With a dynamic batch it leaves the weight plain and oneDNN
reorders it on every call: a 512x512 3x3 convolution at batch 1 took 5.8 ms with the plain
weight and 1.75 ms packed (2-core AVX2 Zen 3), and a ResNet-50 package exported with a dynamic
batch ran at 1.31x eager instead of the static batch's 1.6x.

So :func:`pack_dynamic_convolutions` packs such a weight for the shape Inductor traced with (a
dynamic batch's hint), but only where oneDNN picks the same weight format for every batch in
``BATCHES``: a weight in another format than a call wants is reordered on every call from one
blocked format to another, far slower than from the plain weight (ResNet-50 dynamic-batch
package at batch 1 with every weight packed for batch 2: 300 ms, eager 138 ms; 187 ms of it in
those reorders). Of ResNet-50's 53 convolutions 41 keep one format for batches 1-32 (2 threads);
the 12 others (mostly 1x1 convolutions with 1024-2048 input channels) want one format at batch
1 and another above, and stay plain. Only a dynamic batch (dim 0) is handled: with a dynamic
spatial size the weight stays plain.

The format may also depend on the thread count the program runs with, as it may for the
weights Inductor packs itself for a static shape; a mismatch is slow, never wrong.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.fx.experimental.symbolic_shapes import has_free_symbols

_M = torch.ops.mkldnn
# where the input, the weight and its (padding, stride, dilation, groups) are in each op's
# arguments (Inductor's freezing makes .default; its later fusions the binary forms)
_LAYOUT = {_M._convolution_pointwise.default: (0, 1, 3),
           _M._convolution_pointwise.binary: (0, 2, 4),
           _M._convolution_pointwise_.binary: (1, 2, 4)}


class _Unpicklable(logging.Filter):
    """Inductor's FX graph cache cannot pickle oneDNN-packed constants: a graph holding some is
    not saved (as Inductor's own static-shape graphs with packed weights are not), with a
    warning and a traceback. For the constants this pass adds that is expected: dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("fx graph cache unable to serialize")
                    and "OpaqueTensorImpl" in str(error))


@contextlib.contextmanager
def quiet_unpicklable_constants():
    logger, unpicklable = logging.getLogger("torch._inductor.codecache"), _Unpicklable()
    logger.addFilter(unpicklable)
    try:
        yield
    finally:
        logger.removeFilter(unpicklable)


def _hinted(shape) -> list[int] | None:
    """``shape`` with each symbolic size replaced by its hint (the size traced with)."""
    out = []
    for s in shape:
        if isinstance(s, torch.SymInt):
            hint = s.node.hint
            if hint is None:
                return None
            s = hint
        out.append(int(s))
    return out


BATCHES = (1, 2, 3, 4, 8, 16, 32)  # the batches whose weight format must agree


def _batch_stable(weight: torch.Tensor, params: tuple, size: list[int]):
    """``weight`` packed for input ``size``, if oneDNN wants that same format at every batch
    in BATCHES; else None."""
    def pack(batch):
        return torch.ops.mkldnn._reorder_convolution_weight(weight, *params, [batch, *size[1:]])

    def form(packed):
        return torch.ops.mkldnn._get_mkldnn_serialized_md(packed)

    packed = pack(size[0])
    want = form(packed)
    if all(torch.equal(form(pack(b)), want) for b in BATCHES if b != size[0]):
        return packed
    return None


def pack_dynamic_convolutions(graph: torch.fx.Graph) -> tuple[int, int]:
    """Pack the plain 2-d convolution weights of oneDNN convolutions whose input has a dynamic
    batch, where the format does not depend on the batch (a post-grad pass, after freezing made
    the weights constants). Returns (packed, left plain)."""
    gm = graph.owning_module
    packed = plain = 0
    for node in list(graph.nodes):
        where = _LAYOUT.get(node.target) if node.op == "call_function" else None
        if where is None:
            continue
        x_at, w_at, params_at = where
        x, w = node.args[x_at], node.args[w_at]
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            continue
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        weight = getattr(gm, w.target, None)
        if val is None or not has_free_symbols(val.shape) or not isinstance(weight, torch.Tensor) \
                or weight.layout != torch.strided or weight.dim() != 4:
            continue
        size = _hinted(val.shape)
        if size is None or has_free_symbols(val.shape[1:]):
            plain += 1
            continue
        padding, stride, dilation, groups = node.args[params_at:params_at + 4]
        params = (list(padding), list(stride), list(dilation), groups)
        value = _batch_stable(weight, params, size)
        if value is None:
            plain += 1
            continue
        name = f"_cpuboost_conv_w{packed}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, value, persistent=False)
        with graph.inserting_before(node):
            new_w = graph.get_attr(name)
        new_w.meta.update(w.meta)
        node.replace_input_with(w, new_w)
        if not w.users:  # the plain copy: dropped once nothing reads it
            graph.erase_node(w)
            if hasattr(gm, w.target):
                delattr(gm, w.target)
        packed += 1
    return packed, plain
