"""Linear and Conv modules computing in int8 through torch's oneDNN kernels, or on x86 CPUs
without VNNI or AVX-512 through cpuboost's own int8 GEMM (``nn/int8_gemm.py``: linears and 1x1
convs).

An activation is quantized per tensor to uint8 (``q = clamp(round(x / s) + z, 0, qmax)``); a
weight is quantized symmetrically to int8, one scale per output channel (a per-tensor weight
has the same scale in every channel). oneDNN multiplies u8 x s8 into int32 and applies the
scales, bias and a fused activation on the way out, returning float.

Each module holds its int8 weight once: packed for oneDNN (eager), or plain (``for_compile``)
when the model is to be compiled — then ``forward`` is the quantize/dequantize form, which
Inductor's freezing turns into the same int8 kernels with the quantization fused into the
preceding ops. That form is also ``reference_forward``, the plain-PyTorch oracle of tests.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cpuboost.nn._state import refuse_int8_load
from cpuboost.nn.int8_gemm import U8S8Gemm
# SharedInput lived here: models pickled before it moved name it as cpuboost.nn.int8.SharedInput
from cpuboost.nn.int8_shared import SharedInput  # noqa: F401
from cpuboost.nn.postops import POST_OPS, PostOp, PostOpHolder
from cpuboost.nn.tracing import traces_reference, untraced

_qd = torch.ops.quantized_decomposed
_onednn = torch.ops.onednn
_qlinear = _onednn.qlinear_pointwise.default
_qconv = _onednn.qconv_pointwise.default
# a user's torch.compile of an int8 model: Inductor lowers oneDNN's int8 linear only with the
# packed weight a constant of a frozen graph (an assertion otherwise), so it runs uncompiled
_qlinear_uncompiled = torch.compiler.disable(_qlinear)
W_MIN, W_MAX = -128, 127
_EPS = float(torch.finfo(torch.float32).eps)


def _register_decomposed_ops() -> None:
    """torch defines the quantized_decomposed ops (the quantize/dequantize form Inductor
    matches) in a module it does not import by default; imported when an int8 module is made,
    not when cpuboost is."""
    importlib.import_module("torch.ao.quantization.fx._decomposed")


def _detect():
    from cpuboost.hw import detect  # hw imports torch only; imported late like the ops
    return detect()


def pairs_saturate() -> bool:
    """Whether this CPU's int8 kernels add neighbouring u8 x s8 products in int16 (see
    ``CpuFeatures.int8_pairs_saturate``): then weights are quantized pair-bounded."""
    return _detect().int8_pairs_saturate


def avx2_kernels() -> bool:
    """Whether int8 linears (and the quantization of inputs) run cpuboost's AVX2 kernels
    (``kernels/gemm_u8s8_avx2.cpp``): x86 CPUs with AVX2 but neither AVX-512 nor any VNNI, where
    oneDNN's int8 inner product ran BERT-base's linears at 200-220 GOP/s and the kernel at
    230-270 (2-2.5x at 17-45 rows). It relies on the pair-bounded weights such CPUs get."""
    from cpuboost.kernels import gemm_ops
    return pairs_saturate() and gemm_ops()


def pair_extent(w: torch.Tensor) -> torch.Tensor:
    """Per output channel (dim 0), the largest sum of the positive parts, or of the negative
    parts, of two neighbouring weights along the input-channel dim (1): channels 2i and 2i+1,
    as vpmaddubsw pairs them (an odd count pairs the last with oneDNN's zero padding)."""
    w = w.float()
    if w.shape[1] % 2:
        w = F.pad(w.movedim(1, -1), (0, 1)).movedim(-1, 1)
    pairs = w.reshape(w.shape[0], w.shape[1] // 2, 2, -1)
    pos = pairs.clamp(min=0).sum(2).flatten(1).amax(1)
    neg = pairs.clamp(max=0).sum(2).flatten(1).amin(1).neg()
    return torch.maximum(pos, neg)


def quantize_weight(w: torch.Tensor, per_channel: bool = True, pairwise: Optional[bool] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight (dim 0 = output channels) and its fp32 scale per output channel.

    ``pairwise`` (default: where the CPU needs it, ``pairs_saturate()``): the scale is set by
    ``pair_extent`` instead of max |w|, so that any two neighbouring int8 weights sum to at most
    128 in either sign and u8 inputs up to 255 cannot saturate the int16 pair sum (255 * 128 <
    32767). That costs a fraction of a bit where the largest weights have large neighbours,
    against a whole bit for 7-bit weights or activations."""
    w = w.detach().float().contiguous()  # a transposed view (transformers' Conv1D) too
    pairwise = pairs_saturate() if pairwise is None else pairwise
    if pairwise and w.dim() > 1:
        amax = pair_extent(w)
    else:
        amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    if not per_channel:
        amax = amax.amax().expand(w.shape[0])
    scale = (amax / W_MAX).clamp(min=_EPS).contiguous()
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(view)).clamp(W_MIN, W_MAX).to(torch.int8)
    return q.contiguous(), scale


def requantize_if_saturating(qw: torch.Tensor, scale: torch.Tensor, per_channel: bool
                             ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A given int8 weight (a saved model from a VNNI CPU) whose neighbouring weights could
    saturate this CPU's int16 pair sums, quantized again pair-bounded from its float values;
    None when it is safe as it is."""
    if not pairs_saturate() or qw.dim() < 2 or float(pair_extent(qw).max()) <= W_MAX + 1:
        return None
    view = (-1,) + (1,) * (qw.dim() - 1)
    return quantize_weight(qw.float() * scale.view(view), per_channel, pairwise=True)


def affine_qparams(lo: float, hi: float, qmax: int, symmetric: bool = False
                   ) -> tuple[float, int]:
    """uint8 scale and zero point for the clip range [lo, hi] (0 is always representable; the
    scale is at least float32 eps, so an all-zero input still has a finite reciprocal).
    Symmetric: zero point at the middle and the range +-max|x|."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return max(2 * max(-lo, hi) / qmax, _EPS), (qmax + 1) // 2
    scale = max((hi - lo) / qmax, _EPS)
    return scale, int(min(max(round(-lo / scale), 0), qmax))


def dynamic_qparams(x: torch.Tensor, qmax: int) -> tuple[float, int]:
    """Per-tensor uint8 scale and zero point covering x's range (and 0)."""
    lo, hi = torch.aminmax(x)
    return affine_qparams(float(lo), float(hi), qmax)


class QuantizedWeight(NamedTuple):
    """An int8 weight (output channels first) with its fp32 scale per output channel, given to
    a constructor instead of a float weight (loading a saved int8 model)."""
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dim(self) -> int:
        return self.q.dim()


@contextlib.contextmanager
def plain_int8_weights(model: nn.Module):
    """The int8 layers of ``model`` hold their weights plain (traceable) inside, packed again
    on exit: for capturing an eager int8 model with torch.export."""
    packed = [m for m in model.modules() if isinstance(m, _Int8) and m.packed]
    for m in packed:
        m.for_compile()
    try:
        yield
    finally:
        for m in packed:
            m.for_eager()


class _Int8(U8S8Gemm, PostOpHolder, nn.Module):
    """Shared state: the int8 weight (packed or plain), scales, bias, activation qparams."""

    def _init_common(self, weight, bias, act: Optional[tuple[float, int]], qmax: int,
                     per_channel: bool, post_op: PostOp, smooth: Optional[torch.Tensor] = None):
        _register_decomposed_ops()
        self.orig_dtype = torch.float32 if isinstance(weight, QuantizedWeight) else weight.dtype
        # SmoothQuant: the input is divided by ``smooth`` per input channel (before it is
        # quantized) and the weight multiplied by it, moving outlier channels' range into the
        # per-channel-quantized weight. The float product is unchanged.
        self.smooth = None if smooth is None else smooth.detach().float().contiguous()
        self._inv_smooth = None if smooth is None else 1.0 / self.smooth
        if smooth is not None and not isinstance(weight, QuantizedWeight):
            weight = weight.float() * self.smooth  # (out, in) * (in,)
        # True when a given int8 weight was quantized again for this CPU (requantize_if_saturating)
        self.requantized = False
        if isinstance(weight, QuantizedWeight):
            qw, self.w_scale = weight.q.contiguous(), weight.scale.float().contiguous()
            again = requantize_if_saturating(qw, self.w_scale, per_channel)
            if again is not None:
                (qw, self.w_scale), self.requantized = again, True
        else:
            qw, self.w_scale = quantize_weight(weight, per_channel)
        self.w_zp = torch.zeros(qw.shape[0], dtype=torch.int64)
        self.per_channel = per_channel
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.dynamic = act is None
        self.x_scale, self.x_zp = (None, None) if act is None else (float(act[0]), int(act[1]))
        self.qmax = qmax
        # (scale, zero point) of the next int8 layer's input, when this layer hands its output
        # straight to it as uint8 (set by quantize's hand-off pass): no float round trip
        self.out_q: Optional[tuple[float, int]] = None
        # set (quant.handoff.share_inputs) when sibling layers quantize the same input once
        self.shared_input: Optional[SharedInput] = None
        # True when the input arrives already on this layer's quantization grid (graph mode's
        # quantize_shared_outputs): the compiled form then reads it as a dequantized tensor
        self.input_on_grid = False
        # graph mode: (scale, zero point) to put the float output on, for a consumer pair
        # (an int8 layer and a residual add) that reads it as a dequantized tensor
        self.output_grid: Optional[tuple[float, int]] = None
        # (scale, zero point) of this layer's own calibrated output range, when only residual
        # adds read the output (quant.shared_qdq): graph mode makes it the output_grid
        self.residual_grid: Optional[tuple[float, int]] = None
        self.post_op = post_op
        self.training = False
        self._avx2 = avx2_kernels()
        return qw

    def describe(self) -> dict:
        """The constructor's non-tensor arguments, as JSON-ready values (for saving)."""
        return {"dynamic": self.dynamic, "input_scale": self.x_scale,
                "input_zero_point": self.x_zp, "qmax": self.qmax,
                "per_channel": self.per_channel, "post_op": self.post_op_name,
                "output_qparams": None if self.out_q is None else list(self.out_q),
                "input_group": None if self.shared_input is None else self.shared_input.group}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.qweight, "weight_scale": self.w_scale}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.smooth is not None:
            out["smooth"] = self.smooth
        return out

    _opaque = False  # the weight is oneDNN's packed tensor (a flag: torch.compile's fake tensors
    #                  say is_mkldnn False, and the reference path then read the opaque weight)

    @property
    def packed(self) -> bool:
        return self._opaque or self._u8s8

    @property
    def traced_as_op(self) -> bool:
        """Whether torch.compile sees this layer as one opaque kernel call, its weight kept
        packed, instead of the quantize/dequantize form Inductor lowers to oneDNN's kernels."""
        return False

    @property
    def qweight(self) -> torch.Tensor:
        """The plain int8 weight (a copy when it is held packed, made outside any trace)."""
        if not self.packed:
            return self._w
        with untraced():
            return self._unpacked()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, a fresh float copy in the original dtype, for code that
        reads ``.weight`` (its dtype, its shape). Writing to it changes nothing."""
        w = self._dequantized_weight()
        return (w if self.smooth is None else w / self.smooth).to(self.orig_dtype)

    def for_compile(self) -> None:
        """Hold the weight plain, so a compiler can trace the module (it cannot see into a
        packed tensor); freezing packs it again as a constant of the graph."""
        if self.packed:
            self._w, self._u8s8, self._opaque = self._unpacked(), False, False

    def for_eager(self) -> None:
        if not self.packed:
            self._w = self._pack(self._w)

    def refold(self) -> None:
        """Called when the BatchNorm folded into this layer loads new statistics."""
        raise RuntimeError(
            f"{type(self).__name__} holds int8 weights with a BatchNorm folded in; new float "
            "BatchNorm statistics cannot be folded into them. Load the weights into the float "
            "model and quantize it again.")

    def weight_bytes(self) -> int:
        n = self._w.numel() + self.w_scale.numel() * 4
        return n + (0 if self.bias is None else self.bias.numel() * 4)

    def _act_qparams(self, x: torch.Tensor) -> tuple[float, int]:
        return dynamic_qparams(x, self.qmax) if self.dynamic else (self.x_scale, self.x_zp)

    def _quantize(self, x: torch.Tensor, scale: float, zp: int, inv=None) -> torch.Tensor:
        # The formula of quantized_decomposed.quantize_per_tensor, in place to save passes; one
        # pass in cpuboost's kernel where it runs (same rounding, same float products).
        if inv is None and x.dtype == torch.float32 and self._avx2:
            return torch.ops.cpuboost.quantize_u8(x, scale, zp, self.qmax)
        inv = 1.0 / scale if inv is None else inv
        q = x.float().mul(inv) if x.dtype != torch.float32 else x.mul(inv)
        return q.round_().add_(zp).clamp_(0, self.qmax).to(torch.uint8)

    def _kernel_input(self, x: torch.Tensor, source: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, float, int]:
        """uint8 input and its qparams: as handed over by the previous int8 layer, quantized
        by a sibling reading the same ``source`` (the tensor ``x`` is a view of), or quantized
        here."""
        if x.dtype == torch.uint8:
            return x, self.x_scale, self.x_zp
        if self.smooth is not None:
            if not self.dynamic:  # x / s / scale in the quantize step's one multiply
                if self.__dict__.get("_smooth_mul") is None:
                    self._smooth_mul = self._inv_smooth / self.x_scale  # (K,), made once
                return (self._quantize(x, self.x_scale, self.x_zp, self._smooth_mul),
                        self.x_scale, self.x_zp)
            x = x * self._inv_smooth  # (M, K) / (K,): the range per call is that of x / s
        scale, zp = self._act_qparams(x)
        if self.shared_input is not None and source is not None:  # static: the group's qparams
            return self.shared_input.get(source, lambda: self._quantize(x, scale, zp)), scale, zp
        return self._quantize(x, scale, zp), scale, zp

    def _kernel_output(self, x: torch.Tensor) -> tuple[float, int, torch.dtype]:
        """(output scale, zero point, dtype) for oneDNN: uint8 for the next int8 layer, else
        the input's float dtype (fp32 when the input came in as uint8)."""
        if self.out_q is not None:
            return self.out_q[0], self.out_q[1], torch.uint8
        want = self._float_dtype(x)  # (oneDNN has no fp16 output: cast after, forward)
        return 1.0, 0, want if want in (torch.float32, torch.bfloat16) else torch.float32

    def _float_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the original layer returned: its input's, or where the input came as uint8
        from the int8 layer before, its weights' (a bf16 model's last layer returned fp32)."""
        own = x.dtype if x.is_floating_point() else getattr(self, "orig_dtype", torch.float32)
        return own if own in (torch.bfloat16, torch.float16) else torch.float32

    def _reference_output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.post_op.reference(y)
        if self.out_q is not None:
            return _qd.quantize_per_tensor.default(y, self.out_q[0], self.out_q[1], 0, 255,
                                                   torch.uint8)
        if self.output_grid is not None:
            s, z = self.output_grid
            q = _qd.quantize_per_tensor.default(y, s, z, 0, 255, torch.uint8)
            y = _qd.dequantize_per_tensor.default(q, s, z, 0, 255, torch.uint8)
        return y.to(self._float_dtype(x))

    def _qdq_input(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize x as the int8 kernel sees it (the form Inductor matches)."""
        if x.dtype == torch.uint8:  # handed over quantized by the previous int8 layer
            return _qd.dequantize_per_tensor.default(x, self.x_scale, self.x_zp, 0, self.qmax,
                                                     torch.uint8)
        x = x.float()
        if self.input_on_grid:  # dequant(quant(.)) with our scale already: do not repeat it
            return x
        if self.smooth is not None:
            x = x * self._inv_smooth
        if self.dynamic:
            s, z = _qd.choose_qparams.tensor(x, 0, self.qmax, _EPS, torch.uint8)
            q = _qd.quantize_per_tensor.tensor(x, s, z, 0, self.qmax, torch.uint8)
            return _qd.dequantize_per_tensor.tensor(q, s, z, 0, self.qmax, torch.uint8)
        q = _qd.quantize_per_tensor.default(x, self.x_scale, self.x_zp, 0, self.qmax, torch.uint8)
        return _qd.dequantize_per_tensor.default(q, self.x_scale, self.x_zp, 0, self.qmax,
                                                 torch.uint8)

    def _dequantized_weight(self, qweight: Optional[torch.Tensor] = None) -> torch.Tensor:
        qweight = self.qweight if qweight is None else qweight
        return _qd.dequantize_per_channel.default(qweight, self.w_scale, self.w_zp, 0,
                                                  W_MIN, W_MAX, torch.int8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, t in self.tensors().items():
            destination[prefix + k] = t
        if not self.dynamic:
            destination[prefix + "input_scale"] = torch.tensor(self.x_scale, dtype=torch.float64)
            destination[prefix + "input_zero_point"] = torch.tensor(self.x_zp)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        refuse_int8_load(self, state_dict, prefix, error_msgs)

    def __getstate__(self):
        state = self.__dict__.copy()
        if self.packed:  # a packed tensor has no storage to pickle or deepcopy
            state["_w"] = ("__plain__", self._unpacked())
        return state

    def __setstate__(self, state):
        held = state.get("_w")
        state.setdefault("shared_input", None)  # pickled by a cpuboost without it
        super().__setstate__(state)
        self._avx2 = avx2_kernels()  # this CPU's kernels, not those of the pickling one
        if isinstance(held, tuple) and held[0] == "__plain__":
            self._w = self._pack(held[1])

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))
        if probe.dtype != torch.float32 or probe.device.type != "cpu":
            raise RuntimeError(
                f"{type(self).__name__} holds an int8 weight for the CPU; it cannot be moved or "
                "cast. Quantize the original model again instead.")
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} is an int8 inference module (no "
                               "gradients); train the original model and quantize it again.")
        return super().train(False)

    def accepts(self, op: PostOp) -> bool:
        """Whether oneDNN's int8 kernel for this layer can apply ``op`` (measured: qconv3d
        takes none, qconv1d/2d relu/silu/hardswish, qlinear all but sigmoid)."""
        return op.name in self.supported_post_ops

    def _common_repr(self) -> str:
        act = "dynamic" if self.dynamic else f"input_scale={self.x_scale:.4g}, zp={self.x_zp}"
        parts = [act, "per_channel" if self.per_channel else "per_tensor"]
        if self.qmax != 255:
            parts.append(f"input range 0..{self.qmax}")
        if self.requantized:
            parts.append("weight quantized again: its int16 pair sums would saturate here")
        if self.post_op_name != "none":
            parts.append(f"post_op={self.post_op_name}")
        if self.out_q is not None:
            parts.append("hands uint8 to the next int8 layer")
        if self.smooth is not None:
            parts.append("smoothed")
        return ", ".join(parts)


class Int8Linear(_Int8):
    """``y = act(x @ W.T + b)`` with x quantized per tensor (static scale, or computed per call
    when ``act`` is None) and W per output channel. Input may be (..., in_features)."""

    supported_post_ops = frozenset({"none", "relu", "gelu", "gelu_tanh", "silu", "tanh",
                                    "hardswish"})

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 act: Optional[tuple[float, int]], qmax: int = 255, per_channel: bool = True,
                 post_op: PostOp = POST_OPS["none"], smooth: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._w = self._pack(self._init_common(weight, bias, act, qmax, per_channel, post_op,
                                               smooth))

    def _pack(self, qw: torch.Tensor) -> torch.Tensor:
        self._opaque = not self._fits_u8s8(qw)
        if not self._opaque:
            return self._pack_u8s8(qw)
        self._u8s8 = False
        return _onednn.qlinear_prepack(qw, None)

    def _unpacked(self) -> torch.Tensor:
        if self._u8s8:
            return self._unpack_u8s8()
        return self._w.to_dense().t().contiguous()  # oneDNN's packed is (in, out)

    @property
    def traced_as_op(self) -> bool:  # on cpuboost's kernel: faster than Inductor's oneDNN form
        return self._u8s8  # (convs keep that form: Inductor fuses residual adds into them)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed or traces_reference(self):
            return self.reference_forward(x)
        shape, x2 = x.shape, x.reshape(-1, self.in_features)  # (M, K)
        if self._u8s8:
            y = self._u8s8_forward(x2, x)
        else:
            qx, scale, zp = self._kernel_input(x2, x)
            out_scale, out_zp, out_dtype = self._kernel_output(x)
            run = _qlinear_uncompiled if torch.compiler.is_compiling() else _qlinear
            y = run(qx, scale, zp, self._w, self.w_scale, self.w_zp, self.bias, out_scale,
                    out_zp, out_dtype, self._attr, self._scalars, self._algo)
            y = y if self.out_q is not None else y.to(self._float_dtype(x))  # (fp16)
        return y.reshape(*shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._qdq_input(x), self._dequantized_weight(), self.bias)
        return self._reference_output(y, x)

    def describe(self) -> dict:
        return dict(super().describe(), kind="linear")

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self._common_repr()}"


class Int8Conv(_Int8):
    """Conv1d/2d/3d with a static per-tensor input scale. Conv1d runs as a 2-D conv of height
    1; 2-D/3-D inputs are made channels-last (oneDNN's int8 layout). A 1x1 Conv2d at stride 1
    without padding or groups is a matrix product: on cpuboost's GEMM where it runs."""

    _matmul = False  # set per instance; pickles of older versions lack it

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 act: tuple[float, int], stride, padding, dilation, groups: int,
                 qmax: int = 255, per_channel: bool = True, post_op: PostOp = POST_OPS["none"],
                 input_shape: Optional[tuple[int, ...]] = None):
        super().__init__()
        self.nd = weight.dim() - 2
        self.supported_post_ops = frozenset(
            {"none"} if self.nd == 3 else {"none", "relu", "silu", "hardswish"})
        # nn.Conv's attributes, which models read from their convs (MobileNetV2's TF padding
        # reads kernel_size, stride and dilation in forward)
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        self.padding_mode = "zeros"
        lift = (lambda v, pad: [pad] + list(v)) if self.nd == 1 else (lambda v, pad: list(v))
        # a strided 1x1 conv reads every s-th pixel: where oneDNN's kernel for it is wrong
        # (CpuFeatures.int8_strided_1x1_wrong) the input is subsampled first and the conv runs
        # at stride 1 - the same sum of the same products, in eager and compiled form
        self.subsample = None
        self.input_shape = None if input_shape is None else tuple(input_shape)
        if (all(k == 1 for k in weight.shape[2:]) and not any(self.padding)
                and any(v > 1 for v in self.stride) and _detect().int8_strided_1x1_wrong):
            self.subsample = self.stride
            stride = (1,) * self.nd
            if input_shape is not None:
                input_shape = (*input_shape[:2], *(-(-d // v) for d, v in
                                                   zip(input_shape[2:], self.subsample)))
        self._stride, self._padding = lift(stride, 1), lift(padding, 0)
        self._dilation = lift(dilation, 1)
        if input_shape is not None and self.nd == 1:
            input_shape = (input_shape[0], input_shape[1], 1, input_shape[2])
        self.pack_shape = None if input_shape is None else list(input_shape)
        # a matrix product over channels of the channels-last input: cpuboost's GEMM can run it
        self._matmul = (self.nd == 2 and self.kernel_size == (1, 1) and not any(self.padding)
                        and all(v == 1 for v in stride) and groups == 1)
        qw = self._init_common(weight, bias, act, qmax, per_channel, post_op)
        self._w = self._pack(qw)

    def _pack(self, qw: torch.Tensor) -> torch.Tensor:
        self._opaque = not (self._matmul and self._fits_u8s8(qw))
        if not self._opaque:
            return self._pack_u8s8(qw.flatten(1))
        self._u8s8 = False
        if self.nd == 1:
            qw = qw.unsqueeze(2)  # (O, I, K) -> (O, I, 1, K)
        return _onednn.qconv_prepack(qw, self.w_scale, self.x_scale, self.x_zp, self._stride,
                                     self._padding, self._dilation, self.groups, self.pack_shape)

    def _unpacked(self) -> torch.Tensor:
        if self._u8s8:
            return self._unpack_u8s8()[:, :, None, None]
        w = self._w.to_dense()
        return w.squeeze(2).contiguous() if self.nd == 1 else w.contiguous()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.nd == 1:
            return x.unsqueeze(2)  # (N, C, L) -> (N, C, 1, L)
        fmt = torch.channels_last if self.nd == 2 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)

    def _subsampled(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsample is None:
            return x
        return x[(slice(None), slice(None)) + tuple(slice(None, None, v) for v in self.subsample)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed or traces_reference(self):
            return self.reference_forward(x)
        if self._u8s8:  # [N*H*W, C] @ W^T, channels-last in and out
            x = self._subsampled(x)
            n, _, h, w = x.shape
            y = self._u8s8_forward(x.permute(0, 2, 3, 1).reshape(-1, self.in_channels), x)
            return y.view(n, h, w, -1).permute(0, 3, 1, 2)
        qx, scale, zp = self._kernel_input(self._layout(self._subsampled(x)))
        out_scale, out_zp, out_dtype = self._kernel_output(x)
        y = _qconv(qx, scale, zp, self._w, self.w_scale, self.w_zp, self.bias, self._stride,
                   self._padding, self._dilation, self.groups, out_scale, out_zp, out_dtype,
                   self._attr, self._scalars, self._algo)
        y = y if self.out_q is not None else y.to(self._float_dtype(x))  # (fp16)
        return y.squeeze(2) if self.nd == 1 else y

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        # a Conv1d as a 2-D conv of height 1: Inductor's int8 conv1d got the length wrong
        lift = (lambda t: t.unsqueeze(2)) if self.nd == 1 else (lambda t: t)
        xq, w = self._qdq_input(lift(self._subsampled(x))), lift(self.qweight)
        y = (F.conv3d if self.nd == 3 else F.conv2d)(xq, self._dequantized_weight(w), self.bias,
                                                     self._stride, self._padding, self._dilation,
                                                     self.groups)
        return self._reference_output(y.squeeze(2) if self.nd == 1 else y, x)

    def describe(self) -> dict:
        return dict(super().describe(), kind="conv", stride=list(self.stride),
                    padding=list(self.padding), dilation=list(self.dilation), groups=self.groups,
                    input_shape=None if self.input_shape is None else list(self.input_shape))

    def extra_repr(self) -> str:
        return (f"{self.nd}d, out_channels={self.out_channels}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, {self._common_repr()}")
