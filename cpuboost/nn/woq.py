"""Weight-only quantized Linear: int8 per output channel or int4 per group, float activations.

Decode at batch 1 reads every weight once per token, so it runs at memory speed: fewer weight
bytes is the whole gain. torch's CPU kernels do the work:

- int8: ``torch._weight_int8pack_mm(x, q, scale)`` computes ``x @ (q * scale).T`` reading the
  int8 weight as is (symmetric, one scale per output channel).
- int4: ``torch._weight_int4pack_mm_for_cpu`` on a weight packed by
  ``torch._convert_weight_to_int4pack_for_cpu``; per group of ``group_size`` input channels,
  ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 (asymmetric, or symmetric with zero 0).

With float32 activations on CPUs where cpuboost's AVX2 kernel runs (AVX2+FMA, no AVX-512), an
int8 layer runs that kernel instead (``cpuboost::linear_scaled`` on int8 panels, widened to
float32 in registers, scaled per channel in the last K block): aten's int8 kernel with float32
activations ran GPT-2's decode 3x slower than eager fp32 there. GPT-2's 48 block linears at one
token: int8 panels 5.6 ms, bf16 panels 7.9 ms, fp32 panels 18.4 ms.

Both aten kernels loop over rows, so they are slower than a bf16 GEMM for long prompts (measured
here at 512 rows: int8 3.2x, int4 2.5x the time of a packed bf16 GEMM). An int8 layer fed
``_DEQUANT_ROWS`` rows or more therefore converts its weight to the activation dtype (exact:
int8 values are exact in bf16) and runs a GEMM, scaling the output per channel; an int4 layer
fed ``_DEQUANT_ROWS_INT4`` or more unpacks the kernel's layout ``_ROWS`` channels at a time
(where that layout has a closed form: blocks of 64 channels on AVX-512 builds; blocks of 32 on
AVX2 builds, used there only where the GEMM runs in hardware) and does the same.

Each module holds its quantized weight once. ``state_dict()`` stores a portable form (int8
weight, or int4 nibbles two per byte with the low nibble the even input channel, plus scales and
zero points), independent of the CPU the kernel packed for.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cpuboost.kernels import gemm_ops, unpack_panels
from cpuboost.nn._state import incoming, refuse_cast
from cpuboost.nn.lazy import LazyWeight

# Measured on AVX-512 (bf16): the int8 kernel reads garbage (or crashes) when the number of
# input channels is not a multiple of 16; the int4 packer needs output channels in multiples
# of 16 and input channels in whole groups.
K_MULTIPLE = 16
N_MULTIPLE_INT4 = 16
_DEQUANT_ROWS = 32  # from this many rows on, dequantize + GEMM beats the int8 row kernel
_DEQUANT_ROWS_INT4 = 128  # ... and the int4 one (its unpacking costs more)
_EPS = float(torch.finfo(torch.float32).eps)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned: the bf16 kernels' vector loads assume it (measured: a
    weight sliced out of a loaded file, or an input sliced from a longer one, crashes them)."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


def why_not_woq(out_features: int, in_features: int, bits: int, group_size: int) -> Optional[str]:
    """None if torch's kernel takes this shape, else the reason it does not."""
    if in_features % K_MULTIPLE:
        return f"in_features {in_features} is not a multiple of {K_MULTIPLE} (kernel limit)"
    if bits == 4:
        if out_features % N_MULTIPLE_INT4:
            return (f"out_features {out_features} is not a multiple of {N_MULTIPLE_INT4} "
                    "(int4 packing limit)")
        if in_features % group_size:
            return f"in_features {in_features} is not a multiple of group_size {group_size}"
    return None


_ROWS = 1024  # rows quantized at a time: fp32 temporaries stay small for any layer size


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 (N, K), scale fp32 (N,))."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for r in range(0, w.shape[0], _ROWS):
        rows = w[r:r + _ROWS].float()
        s = (rows.abs().amax(dim=1) / 127).clamp(min=_EPS)
        q[r:r + _ROWS] = torch.round(rows / s[:, None]).clamp(-127, 127)
        scale[r:r + _ROWS] = s
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise int4: (q int32 (N, K) in 0..15, scale (N, K/g), zero (N, K/g)), fp32, with
    ``w ~= (q - 8) * scale + zero`` (torch's int4 kernel convention)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int32)
    scale, zero = torch.empty(n, k // group_size), torch.empty(n, k // group_size)
    for r in range(0, n, _ROWS):
        g = w[r:r + _ROWS].detach().float().reshape(-1, k // group_size, group_size)
        if symmetric:
            s = (g.abs().amax(dim=-1) / 7).clamp(min=_EPS)  # q - 8 in -8..7
            z = torch.zeros_like(s)
            codes = torch.round(g / s[..., None]) + 8
        else:
            lo, hi = g.amin(dim=-1), g.amax(dim=-1)
            s = ((hi - lo) / 15).clamp(min=_EPS)
            z = lo + 8 * s  # q = 0 is the group minimum
            codes = torch.round((g - lo[..., None]) / s[..., None])
        q[r:r + _ROWS] = codes.clamp(0, 15).reshape(-1, k)
        scale[r:r + _ROWS], zero[r:r + _ROWS] = s, z
    return q, scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: (N, K/2) uint8 -> (N, K) int32."""
    lo, hi = (p & 15).to(torch.int32), (p >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)


@lru_cache(maxsize=4)
def _kernel_order(n: int, k: int) -> torch.Tensor:
    """For a weight of shape (n, k): the flat index ``row * k + col`` each nibble of torch's
    CPU int4 pack came from (low nibble first). Learned by packing the digits of the index
    itself, so it follows whatever layout this torch build packs into."""
    index = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        digit = ((index >> shift) & 15).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(digit, 1).reshape(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64)
        order |= nibbles << shift
    return order


def _blocked(packed: torch.Tensor, rows: slice, k: int, width: int) -> torch.Tensor:
    """Rows ``rows`` (multiples of ``width``) of the int4 codes from a pack laid out in blocks
    of ``width`` output channels, each input channel a run of ``width // 2`` bytes: low nibbles
    rows 0..width/2-1, high nibbles the rest of the block (AVX-512 builds: 64; AVX2: 32)."""
    half = width // 2
    blocks = packed.view(-1, k, half)[rows.start // width:rows.stop // width]  # (nb, K, half)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # (nb, K, width)
    return codes.transpose(1, 2).reshape(-1, k)  # (nb * width, K)


@lru_cache(maxsize=1)
def _blocked_width() -> Optional[int]:
    """The block width of this torch build's int4 pack if ``_blocked`` reads it (checked once
    against the learned order: AVX-512 builds pack 64 channels a block, AVX2 ones 32), else
    None (``_kernel_order`` then gathers)."""
    n, k = 128, 64
    codes = torch.arange(n * k).remainder(16).reshape(n, k).to(torch.int32)
    codes = codes ^ (torch.arange(n)[:, None] % 7).to(torch.int32)  # rows differ too
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    for width in (64, 32):
        if torch.equal(_blocked(packed, slice(0, n), k, width).to(torch.int32), codes):
            return width
    return None


class WoqLinear(nn.Module):
    """``y = x @ W.T + b`` with W held in int8 (``bits=8``) or int4 (``bits=4``)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 group_size: int = 0, symmetric: bool = True, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        assert bits in (4, 8), bits
        reason = why_not_woq(out_features, in_features, bits, group_size)
        if reason:
            raise ValueError(f"WoqLinear({in_features}, {out_features}, bits={bits}): {reason}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.compute_dtype = compute_dtype
        self.has_bias = bias
        self._b: Optional[torch.Tensor] = None
        self._q: Optional[torch.Tensor] = None  # int8 (N, K) or panels, or the int4 pack
        # int8 with float32 activations on cpuboost's AVX2 kernel: _q holds its panels
        self._avx2 = bits == 8 and compute_dtype == torch.float32 and gemm_ops()
        self._scale: Optional[torch.Tensor] = None  # int8: (N,); int4: (K/g, N, 2) scale+zero

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                   group_size: int = 0, symmetric: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16) -> "WoqLinear":
        """Quantize ``weight`` (out_features, in_features); the float weight is not kept."""
        n, k = weight.shape
        m = cls(k, n, bits, group_size, symmetric, bias is not None, compute_dtype)
        if bits == 8:
            m._set_int8(*quantize_int8(weight))
        else:
            m._set_int4(*quantize_int4(weight, group_size, symmetric))
        m._b = None if bias is None else bias.detach().to(compute_dtype).clone()
        return m

    # -- storage ----------------------------------------------------------------------------
    def _set_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        q = q.to(torch.int8)
        self._q = torch.ops.cpuboost.pack_linear_weight(q) if self._avx2 else _aligned(q)
        self._scale = _aligned(scale.to(self.compute_dtype))

    @property
    def on_avx2(self) -> bool:
        """int8 weights on cpuboost's AVX2 kernel (float32 activations)."""
        return self._avx2

    def _int8_codes(self) -> torch.Tensor:
        """The int8 weight (N, K), read back from the panels where the kernel holds them."""
        return unpack_panels(self._q, self.out_features) if self._avx2 else self._q

    def _set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self._q = _aligned(torch._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1))
        sz = torch.stack([scale.float(), zero.float()], dim=-1)  # (N, K/g, 2)
        self._scale = _aligned(sz.transpose(0, 1).to(self.compute_dtype))  # (K/g, N, 2)

    def _int4_codes(self, rows: Optional[slice] = None) -> torch.Tensor:
        """The int4 values (N, K) in 0..15 (of ``rows`` only, if given), read back from the
        kernel's pack."""
        n, k = self.out_features, self.in_features
        rows = rows or slice(0, n)
        width = _blocked_width()
        if width and n % width == 0 and rows.start % width == 0 and rows.stop % width == 0:
            return _blocked(self._q, rows, k, width)
        return self._int4_codes_gathered()[rows]

    def _int4_codes_gathered(self) -> torch.Tensor:
        packed = self._q.reshape(-1)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int32)
        q = torch.empty(self.out_features * self.in_features, dtype=torch.int32)
        q[_kernel_order(self.out_features, self.in_features)] = nibbles
        return q.reshape(self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, (out_features, in_features) fp32."""
        if self.bits == 8:
            return self._int8_codes().float() * self._scale.float()[:, None]
        g = self.group_size
        q = self._int4_codes().float().reshape(self.out_features, -1, g)
        scale, zero = self._scale.float().transpose(0, 1).unbind(-1)  # (N, K/g) each
        return ((q - 8) * scale[..., None] + zero[..., None]).reshape(self.out_features, -1)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the compute dtype, for code that reads a layer's
        ``.weight`` (Mamba casts its input to ``lm_head.weight.dtype``): its dtype and shape
        cost nothing, its values are made when an op first reads them (nn.lazy)."""
        return LazyWeight((self.out_features, self.in_features), self.compute_dtype,
                          lambda: self.dequantized().to(self.compute_dtype))

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._b

    def weight_bytes(self) -> int:
        tensors = [t for t in (self._q, self._scale, self._b) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- compute ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (rows, K)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        if self._avx2:  # any alignment; scale and bias applied in the kernel
            y = torch.ops.cpuboost.linear_scaled(x2, self._q, self._scale, self._b,
                                                 self.out_features, 0)
            return y.reshape(*lead, self.out_features)
        x2 = _aligned(x2)  # e.g. the last position of a sequence, sliced for the lm_head
        if self.bits == 8:
            if x2.shape[0] >= _DEQUANT_ROWS:
                # exact int8 -> float copy, one GEMM, per-channel scale on the output
                y = F.linear(x2, self._q.to(self.compute_dtype)) * self._scale
            else:
                y = torch._weight_int8pack_mm(x2, self._q, self._scale)
        elif x2.shape[0] >= _DEQUANT_ROWS_INT4 and self._fast_unpack():
            y = self._int4_gemm(x2)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self._q, self.group_size, self._scale)
        if self._b is not None:
            y = y + self._b
        return y.reshape(*lead, self.out_features)

    def _fast_unpack(self) -> bool:
        """Whether many rows go through unpack + GEMM: the layout reads in closed form, and on
        AVX2 builds only where the GEMM runs in hardware: with bf16 emulated there, it was 3.2x
        slower than the row kernel at 128 and 512 rows (2048 -> 5632, 2-core Zen 3). (AVX-512
        builds keep it, as measured on a Zen 4 with native bf16.)"""
        from cpuboost.hw import detect
        width = _blocked_width()
        return bool(width) and self.out_features % width == 0 and (
            width == 64 or self.compute_dtype == torch.float32 or detect().native_bf16)

    def _int4_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows: dequantize ``_ROWS`` output channels at a time to the activation dtype
        and run a GEMM on each (the int4 row kernel costs ~2.5x a bf16 GEMM at 512 rows)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        scale, zero = (t.t().contiguous() for t in self._scale.unbind(-1))  # (N, K/g) each
        y = torch.empty(x2.shape[0], n, dtype=self.compute_dtype)
        for r in range(0, n, _ROWS):
            rows = slice(r, min(r + _ROWS, n))
            w = self._int4_codes(rows).to(self.compute_dtype).view(-1, k // g, g)  # (R, K/g, g)
            w.sub_(8).mul_(scale[rows, :, None]).add_(zero[rows, :, None])  # in place: fastest
            y[:, rows] = F.linear(x2, w.view(-1, k))
        return y

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain PyTorch in fp32 on the dequantized weight: the test oracle."""
        b = None if self._b is None else self._b.float()
        return F.linear(x.float(), self.dequantized(), b)

    # -- state_dict: the portable quantized form ---------------------------------------------
    def _portable(self) -> dict[str, torch.Tensor]:
        if self.bits == 8:
            state = {"qweight": self._int8_codes(), "scales": self._scale.float()}
        else:
            scale, zero = self._scale.float().transpose(0, 1).unbind(-1)
            state = {"qweight": pack_nibbles(self._int4_codes()),
                     "scales": scale.contiguous(), "zeros": zero.contiguous()}
        if self._b is not None:
            state["bias"] = self._b
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self._portable().items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        current = self._portable() if self._q is not None else self._empty_portable()
        new = {}
        for name, cur in current.items():
            value = incoming(state_dict, prefix + name, cur, strict, missing_keys, error_msgs)
            if value is None:
                return  # missing or wrong shape: recorded, nothing changed
            new[name] = value
        if self.bits == 8:
            self._set_int8(new["qweight"], new["scales"])
        else:
            self._set_int4(unpack_nibbles(new["qweight"]), new["scales"], new["zeros"])
        if "bias" in new:
            self._b = new["bias"].to(self.compute_dtype).clone()

    def _empty_portable(self) -> dict[str, torch.Tensor]:
        n, k = self.out_features, self.in_features
        if self.bits == 8:
            state = {"qweight": torch.zeros(n, k, dtype=torch.int8), "scales": torch.zeros(n)}
        else:
            groups = k // self.group_size
            state = {"qweight": torch.zeros(n, k // 2, dtype=torch.uint8),
                     "scales": torch.zeros(n, groups), "zeros": torch.zeros(n, groups)}
        if self.has_bias:
            state["bias"] = torch.zeros(n, dtype=self.compute_dtype)
        return state

    # -- pickling / deepcopy: the int4 pack is laid out for this CPU; carry the portable form
    def __getstate__(self):
        state = self.__dict__.copy()
        if self.bits == 4 and self._q is not None:
            state["_q"], state["_scale"] = None, None
            state["_portable_int4"] = self._portable()
        return state

    def __setstate__(self, state):
        portable = state.pop("_portable_int4", None)
        state.setdefault("_avx2", False)  # pickled by a cpuboost without the AVX2 path
        super().__setstate__(state)
        if self._avx2 and not gemm_ops():  # unpickled where the kernel cannot run: aten's
            self._q, self._avx2 = _aligned(self._int8_codes()), False
        if portable is not None:
            self._set_int4(unpack_nibbles(portable["qweight"]), portable["scales"],
                           portable["zeros"])

    def _apply(self, fn, recurse=True):
        refuse_cast(self, fn, self.compute_dtype,
                    f"an int{self.bits} weight for the CPU computing in {self.compute_dtype}",
                    "Run cpuboost.llm.optimize on the original model with the dtype you want "
                    "instead.")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        kind = "int8 per-channel" if self.bits == 8 else (
            f"int4 group {self.group_size} {'symmetric' if self.symmetric else 'asymmetric'}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"compute={self.compute_dtype}, bias={self.has_bias}")
