"""Graph passes the `cpuboost` backend adds to Inductor (post-grad, after freezing).

OneDnnLinear: with freezing, Inductor packs fp32 Linear weights for MKL (``mkl._mkl_linear``),
which also keeps the original weight beside the packed one. On the Zen 4 this was built on, MKL's
packed GEMM ran BERT-base at 1.01x of eager while oneDNN's ran it at 1.62x. Per weight shape, the
faster of the two is measured on the running CPU; where oneDNN wins the node becomes
``mkldnn._linear_pointwise`` on a oneDNN-packed constant, and the MKL copies are dropped. It runs
before Inductor's own pattern passes, so their oneDNN post-op fusions (linear + gelu...) apply.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from cpuboost.hw import detect
from cpuboost.passes.kernel_choice import mkl_or_onednn

_MKL_LINEAR = (torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_linear.default)


class OneDnnLinear(CustomGraphPass):
    def __init__(self):
        self.decisions: list[tuple[tuple[int, int, int], str]] = []  # ((M, K, N), kernel)
        self.replaced = 0

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
            choice, _, _ = mkl_or_onednn(batch, k, n, weight.dtype, bias is not None)
            self.decisions.append(((batch, k, n), choice))
            if choice != "onednn":
                continue
            name = f"_cpuboost_onednn_w{self.replaced}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(weight, batch),
                               persistent=False)
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
