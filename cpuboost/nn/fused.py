"""Linear / Conv / ConvTranspose modules that run torch's oneDNN kernels on pre-packed weights,
with an optional folded BatchNorm and a fused post-op.

Each keeps a plain-PyTorch reference path (``reference_forward``) used as the test oracle, and
``state_dict()`` with the original keys, shapes and dtype (the unfolded, unpacked weight).
The packed weight replaces the original; nothing else holds a dense copy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cpuboost.kernels import AVX2_ACTS
from cpuboost.nn._state import incoming, refuse_cast
from cpuboost.nn.lazy import LazyWeight
from cpuboost.nn.postops import POST_OPS, PostOpHolder
from cpuboost.nn.tracing import traces_reference, untraced

_mkldnn = torch.ops.mkldnn
# Resolved overloads: calling these skips the overload lookup torch.ops does per call.
_linear_pointwise = _mkldnn._linear_pointwise.default
_conv = _mkldnn._convolution_pointwise.default
_conv_binary = _mkldnn._convolution_pointwise.binary


def _autocast_dtype() -> Optional[torch.dtype]:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _check_backend(backend: str, dtype: torch.dtype) -> None:
    """Raise if ``backend``'s kernel cannot compute ``dtype`` on this CPU."""
    from cpuboost.errors import UnsupportedRequestError
    from cpuboost.hw.features import detect, onednn_runs
    if backend in ("avx2", "winograd"):
        from cpuboost.kernels import gemm_unavailable
        why = gemm_unavailable()
        if why or dtype != torch.float32:
            kernel = "linear" if backend == "avx2" else "Winograd convolution"
            raise UnsupportedRequestError(
                f"cpuboost's AVX2 {kernel} kernel cannot run {dtype} here"
                f" ({why or 'it computes in float32 only'}): use backend='onednn' or 'aten'.")
    if backend == "onednn" and not onednn_runs(dtype, detect()):
        raise UnsupportedRequestError(
            f"oneDNN cannot pack {dtype} weights on this CPU ({detect().summary()}; bf16 "
            "packing needs AVX512BW/VL/DQ or AVX-NE-CONVERT): use backend='aten', or "
            "compute in float32.")


class _Fused(PostOpHolder, nn.Module):
    """Shared machinery: weight storage (packed or dense), folding, dtype policy, state_dict."""

    out_dim = 0  # which dim of the *original* weight indexes output channels

    def _init_common(self, src: nn.Module, compute_dtype: torch.dtype, backend: str):
        assert backend in ("onednn", "aten", "avx2", "winograd"), backend
        _check_backend(backend, compute_dtype)
        self.backend = backend
        self.compute_dtype = compute_dtype
        self.weight_dtype = compute_dtype  # what the packed weight is held in (see FusedLinear)
        self.orig_dtype = src.weight.dtype
        self.orig_shape = tuple(src.weight.shape)
        self.has_bias = src.bias is not None
        self.post_op = POST_OPS["none"]  # stored as a name, so the module pickles
        self.fold_scale: Optional[torch.Tensor] = None  # per output channel, fp32
        self.fold_shift: Optional[torch.Tensor] = None
        self.pack_shape: Optional[tuple[int, ...]] = None
        self._w: Optional[torch.Tensor] = None  # packed (mkldnn) or dense, folded, compute dtype
        self._b: Optional[torch.Tensor] = None
        self.training = False


    # -- weight storage -------------------------------------------------------------------
    def _to_kernel_layout(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def _from_kernel_layout(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def _pack(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _store(self, w: torch.Tensor, b: Optional[torch.Tensor]) -> None:
        """Store folded weight/bias (original layout, any float dtype) in the kernel's form."""
        held = self.weight_dtype if self.backend == "avx2" else self.compute_dtype
        w = w.detach().to(held).contiguous()
        self._b = None if b is None else b.detach().to(self.compute_dtype).contiguous()
        w = self._to_kernel_layout(w)
        self._w = w if self.backend == "aten" else self._pack(w)

    def _unpack(self, w: torch.Tensor) -> torch.Tensor:
        if not w.is_mkldnn:
            return w
        with untraced():  # a trace would record the opaque tensor (nn.tracing)
            return w.to_dense()

    def _folded_dense(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self._from_kernel_layout(self._unpack(self._w)), self._b

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        shape = [1] * len(self.orig_shape)
        shape[self.out_dim] = -1
        return v.view(shape)

    def raw_weight_and_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The weight and bias as the original module had them (unfolded, original dtype)."""
        w = self._folded_dense()[0].float()
        if self.fold_scale is not None:
            w = w / self._channel_view(self.fold_scale)
        return w.to(self.orig_dtype).reshape(self.orig_shape), self._raw_bias()

    def _raw_bias(self) -> Optional[torch.Tensor]:
        b = self._b
        if b is None or not self.has_bias:
            return None
        b = b.float()
        if self.fold_scale is not None:
            b = (b - self.fold_shift) / self.fold_scale
        return b.to(self.orig_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The original weight for code that reads ``.weight``: its dtype and shape cost
        nothing, its values are a dense copy made when an op first reads them (nn.lazy).
        Writing to it does not change the packed weight: load a state_dict instead."""
        return LazyWeight(self.orig_shape, self.orig_dtype,
                          lambda: self.raw_weight_and_bias()[0])

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._raw_bias()

    def weight_bytes(self) -> int:
        w, b = self._w, self._b
        n = w.numel() * w.element_size() if w is not None else 0
        return n + (b.numel() * b.element_size() if b is not None else 0)

    # -- folding --------------------------------------------------------------------------
    def fold(self, bn) -> None:
        """Fold a FoldedBatchNorm's factors into this module's weight and bias."""
        w, b = self.raw_weight_and_bias()
        self._apply_fold(w, b, bn)

    def _apply_fold(self, w, b, bn) -> None:
        scale, shift = bn.fold_factors()
        self.fold_scale, self.fold_shift = scale, shift
        self.__dict__["_folded_bn"] = bn  # plain reference: bn stays registered where it was
        wf = w.float() * self._channel_view(scale)
        bf = shift if b is None else b.float() * scale + shift
        self._store(wf, bf)

    def refold(self) -> None:
        """Recompute the folded weight after the BatchNorm's statistics were (re)loaded."""
        bn = self.__dict__.get("_folded_bn")
        if bn is not None:
            w, b = self.raw_weight_and_bias()
            self._apply_fold(w, b, bn)

    # -- dtype policy ---------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        # The original layer's output dtype: under the user's autocast what autocast makes it
        # (for an fp32-optimized model), else its weights' (a bf16 model computed in float32
        # returned float32 where its layers returned bf16).
        dt = _autocast_dtype()
        if dt is None:
            low = self.orig_dtype in (torch.bfloat16, torch.float16)
            return y.to(self.orig_dtype) if low and y.dtype != self.orig_dtype else y
        return y if y.dtype == dt or self.compute_dtype != torch.float32 else y.to(dt)

    # -- state_dict: original keys, shapes and dtype ----------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w, b = self.raw_weight_and_bias()
        destination[prefix + "weight"] = w
        if b is not None:
            destination[prefix + "bias"] = b

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        w_raw, b_raw = self.raw_weight_and_bias()
        new = {}
        for name, current in (("weight", w_raw), ("bias", b_raw)):
            if current is None:
                continue
            value = incoming(state_dict, prefix + name, current, strict, missing_keys, error_msgs)
            if value is None and (prefix + name) in state_dict:
                return  # wrong shape: recorded in error_msgs, nothing changed
            new[name] = current if value is None else value.to(self.orig_dtype)
        bn = self.__dict__.get("_folded_bn")
        if bn is not None:
            self._apply_fold(new["weight"], new.get("bias"), bn)
        else:
            self._store(new["weight"], new.get("bias"))

    # -- pickling / deepcopy: mkldnn tensors have no storage, so go through the dense form ---
    def __getstate__(self):
        state = self.__dict__.copy()
        if self._w is not None and self._w.is_mkldnn:
            state["_w"] = ("__dense__", self._from_kernel_layout(self._w.to_dense()))
        return state

    def __setstate__(self, state):
        packed = state.get("_w")
        super().__setstate__(state)
        if isinstance(packed, tuple) and packed[0] == "__dense__":
            self._w = self._pack(self._to_kernel_layout(packed[1]))
        if self.backend in ("avx2", "winograd"):
            from cpuboost.kernels import gemm_ops
            if not gemm_ops():  # pickled where the AVX2 kernel ran, loaded where it cannot
                w = self._unpack(self._w).to(self.compute_dtype)
                self.backend, self._w = "aten", w

    def _apply(self, fn, recurse=True):
        refuse_cast(self, fn, self.compute_dtype,
                    f"a weight packed for the CPU in {self.compute_dtype}",
                    "Call cpuboost.optimize on the original model with the dtype you want "
                    "instead.")
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(
                f"{type(self).__name__} holds a weight packed for inference (no gradients); "
                "train the original model and run cpuboost.optimize on it again afterwards.")
        return super().train(False)

    def extra_repr(self) -> str:
        parts = [f"backend={self.backend}", f"dtype={self.compute_dtype}"]
        if self.backend == "avx2" and self.weight_dtype != self.compute_dtype:
            parts.append(f"weights={self.weight_dtype}")
        if self.fold_scale is not None:
            parts.append("bn_folded")
        if self.post_op.name != "none":
            parts.append(f"post_op={self.post_op}")
        if self.pack_shape:
            parts.append(f"packed_for={list(self.pack_shape)}")
        return ", ".join(parts)


class FusedLinear(_Fused):
    """``weight_dtype=torch.bfloat16`` with the AVX2 backend: the weight is held (rounded) in
    bf16 and multiplied in float32 (exact products of the rounded weight). For CPUs without bf16
    instructions, where bf16 arithmetic is emulated: half the weight bytes, fp32 speed or better
    (decode-size GEMMs read half the memory)."""

    def __init__(self, src: nn.Module, compute_dtype=torch.float32, backend="onednn",
                 batch_hint: Optional[int] = None, weight_dtype: Optional[torch.dtype] = None):
        super().__init__()
        rows, cols = src.weight.shape  # (out, in) for nn.Linear; (in, out) when out_dim == 1
        self.out_features, self.in_features = (cols, rows) if self.out_dim == 1 else (rows, cols)
        self._init_common(src, compute_dtype, backend)
        if weight_dtype not in (None, compute_dtype):
            if backend != "avx2" or weight_dtype != torch.bfloat16:
                from cpuboost.errors import UnsupportedRequestError
                raise UnsupportedRequestError(
                    f"weights held in {weight_dtype} for {compute_dtype} arithmetic: only "
                    "cpuboost's AVX2 kernel does that, for bfloat16 weights (backend='avx2').")
            self.weight_dtype = weight_dtype
        self.batch_hint = batch_hint
        self._store(src.weight, src.bias)

    def _pack(self, w):
        if self.backend == "avx2":
            return torch.ops.cpuboost.pack_linear_weight(w)
        return _mkldnn._reorder_linear_weight(w, self.batch_hint)

    def _unpack(self, w):
        if self.backend == "avx2":  # [ceil(N/16), K, 16] panels back to [N, K]
            from cpuboost.kernels import unpack_panels
            return unpack_panels(w, self.out_features)
        return super()._unpack(w)

    def accepts(self, op) -> bool:
        """Whether this module's kernel can apply the post-op ``op`` itself."""
        return self.backend != "avx2" or op.name in AVX2_ACTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        if self.backend == "onednn" and traces_reference(self):
            y = self.reference_forward(x)
        elif self.backend == "onednn":
            y = _linear_pointwise(x, self._w, self._b, self._attr, self._scalars, self._algo)
        elif self.backend == "avx2":
            act = AVX2_ACTS.get(self.post_op_name)
            y = torch.ops.cpuboost.linear.default(x, self._w, self._b, self.out_features, act or 0)
            if act is None:  # a post-op the kernel has not (never set by the passes: accepts())
                y = self.post_op.reference(y)
        else:
            y = self.post_op.reference(F.linear(x, self._w, self._b))
        return self._finish(y)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._folded_dense()
        return self.post_op.reference(F.linear(self._prepare(x), w.to(self.compute_dtype), b))


class FusedConv1DLinear(FusedLinear):
    """transformers' ``Conv1D`` (GPT-2 and its relatives): ``x @ W + b`` with W stored as
    (in, out). Runs as a packed linear; state_dict keeps Conv1D's (in, out) weight."""

    out_dim = 1

    def _to_kernel_layout(self, w):
        return w.t().contiguous()

    def _from_kernel_layout(self, w):
        return w.t()


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers."""
    kind = type(m)
    return (kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2)


class FusedConv(_Fused):
    """Conv1d/2d/3d. Conv1d runs as a 2-D conv of height 1 (oneDNN packs only 2-D/3-D).
    ``backend="winograd"``: a 3x3 Conv2d on cpuboost's Winograd kernel (passes.winograd); its
    weight is held transformed (4x the bytes), and read back within ~1e-7 (state_dict)."""

    def __init__(self, src: nn.modules.conv._ConvNd, padding: tuple[int, ...],
                 compute_dtype=torch.float32, backend="onednn",
                 input_shape: Optional[tuple[int, ...]] = None, channels_last=True):
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups"):
            setattr(self, name, getattr(src, name))
        self.padding = padding
        self.nd = len(src.kernel_size)
        lift = (lambda v, pad: [pad] + list(v)) if self.nd == 1 else (lambda v, pad: list(v))
        self._padding, self._stride = lift(padding, 0), lift(src.stride, 1)
        self._dilation = lift(src.dilation, 1)
        self.channels_last = channels_last and self.nd in (2, 3)
        self._init_common(src, compute_dtype, backend)
        if input_shape is not None and self.nd == 1:
            input_shape = (input_shape[0], input_shape[1], 1, input_shape[2])
        self.pack_shape = None if input_shape is None else tuple(input_shape)
        self._store(src.weight, src.bias)

    def _to_kernel_layout(self, w):
        return w.unsqueeze(2) if self.nd == 1 and self.backend == "onednn" else w

    def _from_kernel_layout(self, w):
        return w.reshape(self.orig_shape)

    def _pack(self, w):
        if self.backend == "winograd":
            from cpuboost.kernels import winograd_pack
            return winograd_pack(w)
        shape = list(self.pack_shape) if self.pack_shape else None
        return _mkldnn._reorder_convolution_weight(w, self._padding, self._stride, self._dilation,
                                                   self.groups, shape)

    def _unpack(self, w):
        if self.backend == "winograd":
            from cpuboost.kernels import unpack_winograd
            return unpack_winograd(w, self.out_channels)
        return super()._unpack(w)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.nd == 1:
            return x.unsqueeze(2)  # (N, C, L) -> (N, C, 1, L)
        if self.channels_last:
            fmt = torch.channels_last if self.nd == 2 else torch.channels_last_3d
            return x.contiguous(memory_format=fmt)
        return x

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        """conv(x) [+ add] then the post-op, in one oneDNN call. ``add`` is set only by the
        fuse_add pass, which rewrites a block's ``y = conv(x); y += r; relu(y)``."""
        if x.dim() == self.nd + 1:  # one unbatched input, as nn.Conv*d takes
            return self.forward(x[None], None if add is None else add[None])[0]
        if self.backend == "winograd":  # any layout in, channels-last out (as oneDNN's)
            x = self._prepare(x)
            n, _, h, w = x.shape
            out = (n, self.out_channels, h + 2 * self.padding[0] - 2, w + 2 * self.padding[1] - 2)
            if add is None or tuple(add.shape) == out:
                add = None if add is None else self._prepare(add)
                y = torch.ops.cpuboost.conv3x3_winograd.default(
                    x, self._w, self._b, add, self.out_channels, self._padding,
                    AVX2_ACTS[self.post_op_name])
            else:  # an add that broadcasts: the kernel adds only a tensor of the output's shape
                y = torch.ops.cpuboost.conv3x3_winograd.default(
                    x, self._w, self._b, None, self.out_channels, self._padding, 0)
                y = self.post_op.reference(y + self._prepare(add))
            return self._finish(y)
        if self.backend != "onednn" or traces_reference(self):
            return self._finish(self.reference_forward(x, add))
        x = self._layout(self._prepare(x))
        if add is not None:
            add = self._layout(self._prepare(add)) if self.nd != 1 else self._prepare(add).unsqueeze(2)
            unary = None if self._attr == "none" else self._attr
            y = _conv_binary(x, add, self._w, self._b, self._padding, self._stride,
                             self._dilation, self.groups, "add", 1.0, unary, self._scalars,
                             self._algo)
        else:
            y = _conv(x, self._w, self._b, self._padding, self._stride, self._dilation,
                      self.groups, self._attr, self._scalars, self._algo)
        return self._finish(y.squeeze(2) if self.nd == 1 else y)

    def reference_forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
        w, b = self._folded_dense()
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1]
        y = conv(self._prepare(x), w, b, self.stride, self.padding, self.dilation, self.groups)
        if add is not None:
            y = y + self._prepare(add)
        return self.post_op.reference(y)


class FusedConvTranspose(_Fused):
    """ConvTranspose2d/3d with groups == 1 (the weight is stored (in, out, *k))."""

    out_dim = 1

    def __init__(self, src: nn.modules.conv._ConvTransposeNd, compute_dtype=torch.float32,
                 backend="onednn", input_shape: Optional[tuple[int, ...]] = None):
        super().__init__()
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "output_padding", "dilation", "groups"):
            setattr(self, name, getattr(src, name))
        self.nd = len(src.kernel_size)
        self._init_common(src, compute_dtype, backend)
        self.pack_shape = None if input_shape is None else tuple(input_shape)
        self._store(src.weight, src.bias)

    def _from_kernel_layout(self, w):
        # oneDNN hands the packed weight back as (out, in, *k); ours is (in, out, *k)
        return w.transpose(0, 1) if self.backend == "onednn" else w

    def _pack(self, w):
        shape = list(self.pack_shape) if self.pack_shape else None
        return _mkldnn._reorder_convolution_transpose_weight(
            w, list(self.padding), list(self.output_padding), list(self.stride),
            list(self.dilation), self.groups, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if self.backend != "onednn" or traces_reference(self):
            return self._finish(self.reference_forward(x))
        y = _mkldnn._convolution_transpose_pointwise(
            x, self._w, self._b, list(self.padding), list(self.output_padding), list(self.stride),
            list(self.dilation), self.groups, self._attr, self._scalars, self._algo)
        return self._finish(y)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._folded_dense()
        conv = F.conv_transpose2d if self.nd == 2 else F.conv_transpose3d
        y = conv(self._prepare(x), w, b, self.stride, self.padding, self.output_padding,
                 self.groups, self.dilation)
        return self.post_op.reference(y)


def set_backend(module: _Fused, backend: str, pack_shape=None, batch_hint=None) -> None:
    """Re-store a fused module's (folded) weight for another backend / packing shape."""
    _check_backend(backend, module.compute_dtype)
    w, b = module._folded_dense()
    module.backend = backend
    if pack_shape is not None and hasattr(module, "pack_shape"):
        module.pack_shape = tuple(pack_shape)
        if getattr(module, "nd", 0) == 1:
            n, c, length = module.pack_shape
            module.pack_shape = (n, c, 1, length)
    if batch_hint is not None and hasattr(module, "batch_hint"):
        module.batch_hint = batch_hint
    module._store(w, b)
