"""Graph pass: torch's CPU flash attention replaced by cpuboost's kernel where it is allowed.

The kernel (``cpuboost/kernels/attention.cpp``) computes in bf16 with fp32 accumulation, so it
replaces ``aten._scaled_dot_product_flash_attention_for_cpu`` only where the graph already
computes at that precision: bf16 inputs (a bf16 graph), or an int8-quantized graph, whose
attention inputs are fp32 but whose every Linear around it is int8. An fp32 graph keeps torch's
fp32 kernel (fp32 results must stay within 1e-3). Measured on the 2-core Zen 4, 12 heads of 64,
in isolation: length 128 bf16 490 -> 193 us, fp32 inputs 407 -> 203 us; length 45 bf16 132 -> 42
us; batch 8 x 128 bf16 4.9 -> 1.8 ms. Dropout, ``is_causal``, a single query (a decoder's step,
where packing K and V per call would cost more than it saves), head dims other than 32/64/128
and non-contiguous head dims are left to torch.

On CPUs with AVX2 but no AVX-512 the bf16 kernel cannot run; there fp32 attention (fp32 graphs,
and int8 graphs, whose attention inputs are fp32) goes to ``cpuboost::attention_f32``
(``kernels/attention_avx2.cpp``), which computes in fp32 on the fp32 linear kernel's register
tiles (errors ~1e-7 of torch's): BERT-base's 12 heads of 64 took 518 vs 704 us at length 128,
217 vs 278 us at 64 and 75 vs 102 us at 17 against torch's flash attention (2-core Zen 3).
"""
from __future__ import annotations

import functools
import hashlib
import math
import operator
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from cpuboost.kernels import _SOURCE, attention_op

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _int8(graph: torch.fx.Graph) -> bool:
    """Inductor's int8 forms, or cpuboost's int8 linear kernel (graph mode on AVX2 CPUs)."""
    return any(n.op == "call_function" and str(n.target).startswith(
        ("quantized_decomposed.", "onednn.q", "cpuboost.linear_u8s8")) for n in graph.nodes)


def _f32_op():
    """``cpuboost::attention_f32`` where it runs (AVX2 without AVX-512), else None."""
    from cpuboost.kernels import gemm_ops
    return torch.ops.cpuboost.attention_f32.default if gemm_ops() else None


def _takes(node: torch.fx.Node) -> bool:
    """Whether a kernel of ours may compute this flash-attention call at all."""
    q, k, v = (a.meta.get("val") for a in node.args[:3])
    dropout = node.args[3] if len(node.args) > 3 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[4] if len(node.args) > 4 else node.kwargs.get("is_causal", False)
    mask = node.kwargs.get("attn_mask")
    mask = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else mask
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)) or dropout \
            or causal or any(t.stride(-1) != 1 for t in (q, k, v)) \
            or q.shape[2] == 1:  # one query (a decode step): repacking K and V would dominate
        return False
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                 and mask.dtype in (torch.float32, torch.bfloat16, torch.bool)):
        return False
    # only the output is read (logsumexp is for training)
    return bool(node.users) and all(
        u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def _choose(node: torch.fx.Node, int8: bool) -> tuple:
    """(the op computing this attention or None for torch's, whether the bf16 kernel would
    have been allowed but cannot run here)."""
    if not _takes(node):
        return None, False
    q = node.args[0].meta["val"]
    bf16_ok = (q.dtype == torch.bfloat16 or int8 and q.dtype == torch.float32) and \
        q.shape[-1] in (32, 64, 128)
    if bf16_ok and attention_op() is not None:
        return attention_op(), False
    if q.dtype == torch.float32 and _f32_op() is not None:
        return _f32_op(), False
    return None, bf16_ok


class FastAttention(CustomGraphPass):
    def __init__(self):
        self.replaced = 0  # on the bf16 kernel
        self.replaced_f32 = 0  # on the fp32 AVX2 kernel
        self.missed = 0  # calls the bf16 kernel would have taken, where no kernel of ours runs

    def __call__(self, graph: torch.fx.Graph) -> None:
        int8 = None
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not _FLASH:
                continue
            int8 = _int8(graph) if int8 is None else int8
            op, missed = _choose(node, int8)
            self.missed += missed
            if op is None:
                continue
            q = node.args[0]
            scale = node.kwargs.get("scale")
            scale = 1.0 / math.sqrt(q.meta["val"].shape[-1]) if scale is None else float(scale)
            with graph.inserting_before(node):
                new = graph.call_function(op, (q, node.args[1], node.args[2],
                                               node.kwargs.get("attn_mask"), scale))
            for user in list(node.users):
                new.meta.update(user.meta)  # the same output: shape, dtype and strides
                user.replace_all_uses_with(new)
                graph.erase_node(user)
            graph.erase_node(node)
            if op is attention_op():
                self.replaced += 1
            else:
                self.replaced_f32 += 1

    def uuid(self) -> str:
        return (_source_key() + ("-off" if attention_op() is None else "")
                + ("-f32" if _f32_op() is not None else ""))


@functools.cache
def _source_key() -> str:  # read once: uuid() is asked at every compile's cache lookup
    # Every kernel source, not only the attention's: a cached graph calls cpuboost's ops with
    # the arguments of the schema it was compiled against (a graph Inductor's cache held
    # crashed once an op took one more argument), and this pass's own code: a cached graph must
    # not outlive a change to what it rewrites.
    kernels = sorted(_SOURCE.parent.glob("*.cpp")) + sorted(_SOURCE.parent.glob("*.h"))
    text = b"".join(f.read_bytes() for f in [*kernels, Path(__file__)])
    return "cpuboost-kernels-" + hashlib.sha256(text).hexdigest()[:12]
