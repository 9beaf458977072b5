"""How the `cpuboost` backend changes Inductor's fp32 Linear packing.

With freezing, Inductor packs every fp32 Linear weight for MKL (``mkl._mkl_linear``), which also
keeps the original weight beside the packed one. On the Zen 4 this was built on, MKL's packed
GEMM ran BERT-base at 1.01x of eager while oneDNN's ran it at 1.62x. Per weight shape, the faster
of the two is measured on the running CPU (``OneDnnLinear.choose``), and where oneDNN wins:

* ``onednn_where_faster()`` makes Inductor's packing pattern emit ``mkldnn._linear_pointwise``
  on a oneDNN-packed weight in the first place (the path it takes for bf16), so no MKL copy is
  ever made: packing GPT-2's fp32 weights for MKL first, then repacking, peaked at 2.8x the
  eager process's RSS;
* the ``OneDnnLinear`` graph pass (post-grad, after freezing) rewrites any ``mkl._mkl_linear``
  still left onto a oneDNN-packed constant and drops the MKL copies.

Either way Inductor's own oneDNN post-op fusions (linear + gelu...) still apply afterwards.
"""
from __future__ import annotations

import contextlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from cpuboost.compile.attention_pass import FastAttention
from cpuboost.compile.shared_constants import made_once
from cpuboost.hw import detect
from cpuboost.passes.kernel_choice import mkl_or_onednn

_MKL_LINEAR = (torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_linear.default)


class OneDnnLinear(CustomGraphPass):
    def __init__(self):
        self.decisions: list[tuple[tuple[int, int, int], str]] = []  # ((M, K, N), kernel)
        self.replaced = 0
        self.attention = FastAttention()  # chained after this pass (backend.inductor_scope)

    def choose(self, batch: int, k: int, n: int, dtype: torch.dtype) -> str:
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():  # Inductor's patterns run under fake tensors: time real ones
            choice, _, _ = mkl_or_onednn(batch, k, n, dtype, True)
        if ((batch, k, n), choice) not in self.decisions:
            self.decisions.append(((batch, k, n), choice))
        return choice

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _MKL_LINEAR:
                continue
            x, mkl_w, orig_w, bias, batch = node.args
            if orig_w.op != "get_attr" or not isinstance(batch, int):
                continue
            weight = getattr(gm, orig_w.target)
            n, k = weight.shape
            if self.choose(batch, k, n, weight.dtype) != "onednn":
                continue
            name = f"_cpuboost_onednn_w{self.replaced}"
            while hasattr(gm, name):
                name += "_"
            packed = made_once(  # one packed copy for all graphs (any batch: shared_constants)
                ("onednn_linear",), weight,
                lambda: torch.ops.mkldnn._reorder_linear_weight(weight, batch))
            gm.register_buffer(name, packed, persistent=False)
            with graph.inserting_before(node):
                packed = graph.get_attr(name)
                packed.meta["val"] = orig_w.meta.get("val")
                new = graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                          (x, packed, bias, "none", [], ""))
                new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for const in (mkl_w, orig_w):  # the MKL copies: drop them once nothing reads them
                if const.op == "get_attr" and not const.users:
                    graph.erase_node(const)
                    if hasattr(gm, const.target):
                        delattr(gm, const.target)
            self.replaced += 1

    def uuid(self) -> str:
        # Choices are measured on this CPU at this thread count: a cached graph is reused
        # only where the same measurement would apply.
        hw = detect()
        return f"cpuboost.OneDnnLinear.v1|{hw.model_name}|{sorted(hw.flags)}|{torch.get_num_threads()}"


@contextlib.contextmanager
def onednn_where_faster(linear_pass: OneDnnLinear):
    """While compiling: Inductor's fp32 Linear packing takes its oneDNN path (the one it uses for
    bf16) for every shape where ``linear_pass`` measures oneDNN faster than MKL."""
    try:
        from torch._inductor.fx_passes.mkldnn_fusion import CpuMkldnnDeviceOp
    except ImportError:  # a torch built without oneDNN: the graph pass alone (it finds nothing)
        yield
        return
    pack_weight, pack_linear = CpuMkldnnDeviceOp.pack_linear_weight, CpuMkldnnDeviceOp.pack_linear
    if getattr(pack_weight, "_cpuboost", False):  # a nested compile: already in place
        yield
        return

    def onednn(transpose_weight_node, batch_size) -> bool:
        weight_t = transpose_weight_node.args[0].meta.get("val")  # mm/addmm's (k, n) operand
        if not isinstance(batch_size, int) or weight_t is None or weight_t.dim() != 2:
            return False
        k, n = weight_t.shape
        return linear_pass.choose(batch_size, k, n, weight_t.dtype) == "onednn"

    def patched_weight(self, graph, is_lp_weight, transpose_weight_node, batch_size):
        lp = is_lp_weight or onednn(transpose_weight_node, batch_size)
        return pack_weight(self, graph, lp, transpose_weight_node, batch_size)

    def patched_linear(self, graph, is_lp_weight, batch_size, input, packed_weight_node, bias):
        lp = is_lp_weight or packed_weight_node.target is torch.ops.mkldnn._reorder_linear_weight
        if lp and not is_lp_weight:
            linear_pass.replaced += 1
        return pack_linear(self, graph, lp, batch_size, input, packed_weight_node, bias)

    patched_weight._cpuboost = True
    CpuMkldnnDeviceOp.pack_linear_weight, CpuMkldnnDeviceOp.pack_linear = (
        patched_weight, patched_linear)
    try:
        yield
    finally:
        CpuMkldnnDeviceOp.pack_linear_weight, CpuMkldnnDeviceOp.pack_linear = (
            pack_weight, pack_linear)
