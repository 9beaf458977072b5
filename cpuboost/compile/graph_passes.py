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

On CPUs with AVX2 but no AVX-512, fp32 linears run cpuboost's own kernel instead
(``cpuboost.kernels``, 1.05-1.4x oneDNN's speed on BERT-base's GEMMs there): Inductor's
packing pattern emits ``cpuboost::pack_linear_weight`` and ``cpuboost::linear`` (no MKL copy
either), the graph pass rewrites any MKL linear left the same way, and an activation (ReLU,
tanh, sigmoid, erf-GELU) computed from a linear's output alone is moved into the kernel
(``fuse_activations``). Also under AOT compilation: ``cpuboost.export`` records the ops a
package calls and ``cpuboost.load`` loads their library first.

The same pass moves qualifying 3x3 convolutions onto cpuboost's Winograd kernel on those CPUs
(``winograd_pass``), packs convolution weights Inductor left plain because the input shape
is dynamic (``conv_pack``), and puts EmbeddingBags on the forward-only kernel on any CPU
(``forward_only_embedding_bags``).
"""
from __future__ import annotations

import contextlib
import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from cpuboost.compile.attention_pass import FastAttention
from cpuboost.compile.conv_pack import pack_dynamic_convolutions
from cpuboost.compile.shared_constants import made_once
from cpuboost.compile.winograd_pass import winograd_convolutions
from cpuboost.hw import detect
from cpuboost.passes.kernel_choice import mkl_or_onednn

_MKL_LINEAR = (torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_linear.default)
_SQRT_HALF = 0.7071067811865476
_CONVERT = torch.ops.prims.convert_element_type.default


def _own_kernel(dtype: torch.dtype) -> bool:
    """cpuboost's AVX2 linear kernel for this dtype (fp32 only). Also under AOT compilation:
    ``cpuboost.export`` records the op in the package's metadata and ``load`` loads it first."""
    if dtype != torch.float32:
        return False
    from cpuboost.kernels import gemm_ops
    return gemm_ops()


def _own_op(name: str):
    """cpuboost's op ``name`` where its library is loaded, else None (and no node calls it): on
    CPUs without the AVX2 kernels (AVX-512, Arm) it never is, and naming the op there raised
    AttributeError inside every compile with a Linear, so graph mode ran eager."""
    namespace = torch.ops.cpuboost
    return getattr(namespace, name).default if hasattr(namespace, name) else None


def _is_op(node, target, *args) -> bool:
    """``node`` calls ``target`` (an OpOverload or its packet); ``args``, where given, match
    its arguments (a node or a number)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is not target and getattr(node.target, "overloadpacket", None) is not target:
        return False
    return all(a is None or _same(x, a) for x, a in zip(node.args, args)) and \
        len(node.args) >= len(args)


def _same(x, a) -> bool:
    if isinstance(a, torch.fx.Node) or isinstance(x, torch.fx.Node):
        return x is a
    return isinstance(x, (int, float)) and abs(x - a) < 1e-6


def _gelu_of(y: torch.fx.Node):
    """The node computing erf-GELU of ``y``, if ``y`` feeds nothing else: the decomposed form
    (y * 0.5) * (erf(y * 0.7071...) + 1), either operand order."""
    aten = torch.ops.aten
    users = list(y.users)
    if len(users) != 2:
        return None
    half = next((u for u in users if _is_op(u, aten.mul, y, 0.5)), None)
    scaled = next((u for u in users if _is_op(u, aten.mul, y, _SQRT_HALF)), None)
    if half is None or scaled is None or len(scaled.users) != 1:
        return None
    erf = next(iter(scaled.users))
    if not _is_op(erf, aten.erf, scaled) or len(erf.users) != 1:
        return None
    plus = next(iter(erf.users))
    if not _is_op(plus, aten.add, erf, 1) or len(plus.users) != 1 or len(half.users) != 1:
        return None
    out = next(iter(plus.users))
    if out is not next(iter(half.users)) or not _is_op(out, aten.mul):
        return None
    return out if set(out.args[:2]) == {half, plus} else None


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.reshape.default)


# single-node activations -> cpuboost::linear's activation code (cpuboost.kernels.AVX2_ACTS)
_ONE_NODE_ACTS = {torch.ops.aten.relu.default: 1, torch.ops.aten.tanh.default: 4,
                  torch.ops.aten.sigmoid.default: 5}


def _activation_of(y: torch.fx.Node):
    """(node computing the activation, kernel code) for ReLU, tanh, sigmoid or erf-GELU applied
    to ``y`` alone, or None."""
    if len(y.users) == 1:
        user = next(iter(y.users))
        code = _ONE_NODE_ACTS.get(user.target) if user.op == "call_function" else None
        return (user, code) if code is not None and user.args[0] is y else None
    gelu = _gelu_of(y)
    return None if gelu is None else (gelu, 2)


def fuse_activations(graph: torch.fx.Graph) -> int:
    """Move each activation (ReLU, tanh, sigmoid, erf-GELU) applied to a ``cpuboost::linear``
    output alone (or to a view of it, as the 2-d GEMM of a 3-d input is) into the kernel."""
    linear = torch.ops.cpuboost.linear.default
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not linear or node.args[4] != 0 or \
                getattr(node, "_erased", False):
            continue
        view = next(iter(node.users)) if len(node.users) == 1 else None
        view = view if view is not None and view.target in _VIEWS else None
        found = _activation_of(view if view is not None else node)
        if found is None:
            continue
        act, code = found
        with graph.inserting_before(act):
            new = graph.call_function(linear, (*node.args[:4], code))
            new.meta.update(node.meta)
            if view is not None:
                new = graph.call_function(view.target, (new, *view.args[1:]), view.kwargs)
                new.meta.update(act.meta)
        act.replace_all_uses_with(new)
        stack = [act]  # the activation's nodes and the old linear, now unused
        while stack:
            n = stack.pop()
            if isinstance(n, torch.fx.Node) and n.op == "call_function" and not n.users and \
                    not getattr(n, "_erased", False):
                stack.extend(n.args)
                graph.erase_node(n)
        fused += 1
    return fused


class OneDnnLinear(CustomGraphPass):
    """``weight_dtype=torch.bfloat16``: linears on cpuboost's AVX2 kernel hold bf16 weights
    (multiplied in float32; see FusedLinear), for dtype=bfloat16 on CPUs without bf16."""

    def __init__(self, weight_dtype: torch.dtype = torch.float32):
        self.weight_dtype = weight_dtype
        self.decisions: list[tuple[tuple[int, int, int], str]] = []  # ((M, K, N), kernel)
        self.replaced = 0  # linears moved to oneDNN
        self.own = 0  # linears on cpuboost's AVX2 kernel
        self.shared = 0  # linears on a weight also read elsewhere (a tied head): not packed
        self.activations_fused = 0
        # convolution weights of a dynamic batch: packed (one format for every batch), plain
        self.convs_packed = self.convs_plain = 0
        self.winograd = 0  # 3x3 convolutions on cpuboost's Winograd kernel
        self.embedding_bags = 0  # EmbeddingBags on the forward-only kernel
        self.attention = FastAttention()  # chained after this pass (backend.inductor_scope)

    def choose(self, batch, k: int, n: int, dtype: torch.dtype) -> str:
        """"avx2" (cpuboost's kernel), "onednn" or "mkl" for a linear of this shape."""
        from torch.utils._python_dispatch import _disable_current_modes
        if _own_kernel(dtype):
            choice = "avx2"
        elif not isinstance(batch, int):
            return "onednn"  # a dynamic batch: Inductor's own choice (MKL needs a fixed one)
        else:
            with _disable_current_modes():  # patterns run under fake tensors: time real ones
                choice, _, _ = mkl_or_onednn(batch, k, n, dtype, True)
        shape = (batch if isinstance(batch, int) else str(batch), k, n)
        if (shape, choice) not in self.decisions:
            self.decisions.append((shape, choice))
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
            choice = self.choose(batch, k, n, weight.dtype)
            if choice == "mkl":
                continue
            name = f"_cpuboost_{choice}_w{self.replaced + self.own}"
            while hasattr(gm, name):
                name += "_"
            if choice == "avx2":  # one packed copy for all graphs (shared_constants)
                held = self.weight_dtype
                packed = made_once(("avx2_linear", str(held)), weight,
                                   lambda: torch.ops.cpuboost.pack_linear_weight(weight.to(held)))
                op, args = torch.ops.cpuboost.linear.default, (bias, n, 0)
            else:  # any batch
                packed = made_once(("onednn_linear",), weight,
                                   lambda: torch.ops.mkldnn._reorder_linear_weight(weight, batch))
                op, args = torch.ops.mkldnn._linear_pointwise.default, (bias, "none", [], "")
            gm.register_buffer(name, packed, persistent=False)
            with graph.inserting_before(node):
                packed_node = graph.get_attr(name)
                packed_node.meta["val"] = orig_w.meta.get("val")
                new = graph.call_function(op, (x, packed_node, *args))
                new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            for const in (mkl_w, orig_w):  # the MKL copies: drop them once nothing reads them
                if const.op == "get_attr" and not const.users:
                    graph.erase_node(const)
                    if hasattr(gm, const.target):
                        delattr(gm, const.target)
            if choice == "avx2":
                self.own += 1
            else:
                self.replaced += 1
        if _own_kernel(torch.float32):
            self.activations_fused += fuse_activations(graph)
            self.winograd += winograd_convolutions(graph)  # before packing what stays on oneDNN
        packed, plain = pack_dynamic_convolutions(graph)
        self.convs_packed, self.convs_plain = self.convs_packed + packed, self.convs_plain + plain
        self.embedding_bags += forward_only_embedding_bags(graph)

    def uuid(self) -> str:
        # Choices are measured on this CPU at this thread count: a cached graph is reused
        # only where the same measurement would apply.
        hw = detect()
        return (f"cpuboost.OneDnnLinear.v7|{self.weight_dtype}|{hw.model_name}|{sorted(hw.flags)}|"
                f"{torch.get_num_threads()}")


def forward_only_embedding_bags(graph: torch.fx.Graph) -> int:
    """``aten._embedding_bag`` whose result alone is used (an inference graph) becomes
    ``_embedding_bag_forward_only``, the kernel eager PyTorch calls under no_grad: the full
    one also builds what backward needs (offset2bag, bag sizes). The compiled DLRM-like model
    spent ~1 ms per batch in it against 0.63 ms eager for its 8 tables. Where backward reads
    those outputs (a training graph), the node is left as it is."""
    changed = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _EMBEDDING_BAG and all(
                user.op == "call_function" and user.target is operator.getitem
                and (user.args[1] == 0 or not user.users) for user in node.users):
            node.target = _EMBEDDING_BAG_FORWARD_ONLY
            changed += 1
    return changed


_EMBEDDING_BAG = torch.ops.aten._embedding_bag.default
_EMBEDDING_BAG_FORWARD_ONLY = torch.ops.aten._embedding_bag_forward_only.default
_MATMUL = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.permute.default)


def _constant(gm: torch.nn.Module, target: str):
    """A get_attr node's value; exported graphs name nested ones by path (``model.head.weight``)."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def read_elsewhere(graph: torch.fx.Graph, weight: torch.fx.Node) -> bool:
    """Whether the constant ``weight`` (a linear's (k, n) operand, a view of the Linear's weight)
    is also read as it is at run time by something other than a matmul: a language model's
    head tied to its token embedding. Packing it would keep the weight twice (XLM-R: 768 MB of
    250002 x 768, the graph's peak RSS 1.99x eager's), so such a linear runs oneDNN on the plain
    weight (250002 x 768 measured against the packed AVX2 kernel: 516 vs 797 ms at 128 tokens,
    5.3 vs 6.9 ms at 1, 117 vs 68 ms at 17)."""
    gm = graph.owning_module
    if weight.op != "get_attr" or gm is None:
        return False
    tensor = _constant(gm, weight.target)
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        return False
    storage = tensor.untyped_storage().data_ptr()
    for node in graph.find_nodes(op="get_attr"):
        other = _constant(gm, node.target)
        if isinstance(other, torch.Tensor) and other.layout == torch.strided and \
                other.untyped_storage().data_ptr() == storage and \
                any(user.target not in _MATMUL for user in node.users):
            return True
    return False


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

    def choice(transpose_weight_node, batch_size) -> str:
        weight_t = transpose_weight_node.args[0].meta.get("val")  # mm/addmm's (k, n) operand
        if weight_t is None or weight_t.dim() != 2:
            return "mkl"
        k, n = weight_t.shape
        return linear_pass.choose(batch_size, k, n, weight_t.dtype)

    def patched_weight(self, graph, is_lp_weight, transpose_weight_node, batch_size):
        if not is_lp_weight and linear_pass.weight_dtype == torch.float32 and \
                read_elsewhere(graph, transpose_weight_node.args[0]):
            return transpose_weight_node  # the plain weight (see read_elsewhere)
        chosen = "lp" if is_lp_weight else choice(transpose_weight_node, batch_size)
        if chosen == "avx2":  # transpose_weight_node is the (n, k) weight, as Linear holds it
            weight = transpose_weight_node
            if linear_pass.weight_dtype != torch.float32:  # folded with the pack (freezing)
                weight = graph.create_node("call_function", _CONVERT,
                                           args=(weight, linear_pass.weight_dtype))
            return graph.create_node("call_function", torch.ops.cpuboost.pack_linear_weight.default,
                                     args=(weight,))
        return pack_weight(self, graph, chosen != "mkl", transpose_weight_node, batch_size)

    def patched_linear(self, graph, is_lp_weight, batch_size, input, packed_weight_node, bias):
        if packed_weight_node.target is torch.ops.aten.permute.default:  # not packed
            linear_pass.shared += 1
            return graph.create_node("call_function", torch.ops.mkldnn._linear_pointwise.default,
                                     (input, packed_weight_node, bias, "none", [], ""))
        own_pack = _own_op("pack_linear_weight")
        if own_pack is not None and packed_weight_node.target is own_pack:
            weight = packed_weight_node.args[0]
            if weight.target is _CONVERT:
                weight = weight.args[0]
            n = weight.args[0].meta["val"].shape[1]  # mm's (k, n) operand
            linear_pass.own += 1
            return graph.create_node("call_function", torch.ops.cpuboost.linear.default,
                                     (input, packed_weight_node, bias, n, 0))
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
