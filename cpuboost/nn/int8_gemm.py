"""int8 layers on cpuboost's AVX2 int8 GEMM (``kernels/gemm_u8s8_avx2.cpp``), for CPUs with
AVX2 but neither AVX-512 nor VNNI (``nn.int8.avx2_kernels``), where it ran BERT-base's linears
and ResNet-50's 1x1 convolutions faster than oneDNN's int8 kernels (docs/quantize.md).

A layer whose product is one matrix product over its input's last dim uses it: ``Int8Linear``,
and ``Int8Conv`` for 1x1 convolutions at stride 1 without padding or groups (a strided one
subsamples its input first on these CPUs), whose channels-last input is a [pixels, channels]
matrix. The weight is held once, in the kernel's packing."""
from __future__ import annotations

import torch

from cpuboost.kernels import AVX2_ACTS, unpack_u8s8


class U8S8Gemm:
    """Mixin for ``nn.int8._Int8`` layers: pack for, run on and unpack from the kernel."""

    _u8s8 = False  # the weight is held in the kernel's packing
    MAX_IN = 65536  # input features whose int32 sums cannot overflow (the kernel refuses more)

    def _fits_u8s8(self, qw: torch.Tensor) -> bool:
        """Whether this CPU runs the kernel and the [out, in...] weight fits it."""
        return self._avx2 and qw[0].numel() <= self.MAX_IN

    def _pack_u8s8(self, qw: torch.Tensor) -> torch.Tensor:
        """[out, in] int8 -> the kernel's panels, with the int32 column sums its epilogue takes
        the input's zero point out with."""
        self._colsum = qw.sum(1, dtype=torch.int32)
        self._u8s8, self._u8s8_in = True, qw.shape[1]
        return torch.ops.cpuboost.pack_u8s8_weight(qw)

    def _unpack_u8s8(self) -> torch.Tensor:
        """The [out, in] int8 weight."""
        return unpack_u8s8(self._w, self._colsum.numel(), self._u8s8_in)

    def _u8s8_forward(self, x2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[M, in] -> [M, out]. A float input without smoothing or siblings to share it with is
        quantized inside the kernel (its range measured there when the layer is dynamic); the
        output is uint8 for the next int8 layer, else the original layer's float dtype. Traced by
        torch.compile as one opaque op: then a smoothed input is divided here and quantized in
        the kernel, and siblings do not share (their run-time check is Python state). An
        ``output_grid`` is not applied: it exists so that Inductor can fuse a residual add into
        oneDNN's int8 kernel, which this op is not; the output stays float, closer to fp32."""
        eager = not torch.compiler.is_compiling()
        if x2.dtype == torch.uint8 or (eager and (self.smooth is not None
                                                 or self.shared_input is not None)):
            qx, scale, zp = self._kernel_input(x2, x)
        else:
            qx = x2.float() if self.smooth is None else x2.float() * self._inv_smooth
            scale, zp = (0.0, 0) if self.dynamic else (self.x_scale, self.x_zp)
        out_scale, out_zp = (0.0, 0) if self.out_q is None else self.out_q
        y = torch.ops.cpuboost.linear_u8s8(qx, self._w, self.w_scale, self._colsum, self.bias,
                                           self._colsum.numel(), AVX2_ACTS[self.post_op_name],
                                           scale, zp, self.qmax, out_scale, out_zp)
        return y if self.out_q is not None else y.to(self._float_dtype(x))
