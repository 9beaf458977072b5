"""Embedding / EmbeddingBag holding their table for inference.

* bf16/fp16: the table is held in that dtype. A lookup reads whole rows from memory that is
  rarely in cache (DLRM's tables are 200 MB), so half the bytes per row is most of the gain.
* fp32: the table is held as a plain tensor (the same storage, no copy). torch runs the
  forward-only EmbeddingBag kernel only when the weight does not require grad, which a
  Parameter always does, even under ``no_grad``: 13.6 -> 7.4 us per 256-bag lookup here.

The result is returned in the original dtype — what torch.autocast gives for embedding ops, so
downstream dtypes do not change — unless ``out_dtype`` says otherwise: the embedding_tables
pass sets it where the recorded dataflow shows that every consumer rounds to that dtype anyway.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cpuboost.nn._state import incoming, refuse_int8_load


class _HeldTable(nn.Module):
    def _init_table(self, src: nn.Module, dtype: torch.dtype):
        self.num_embeddings, self.embedding_dim = src.num_embeddings, src.embedding_dim
        self.padding_idx = src.padding_idx
        self.orig_dtype = src.weight.dtype
        self.compute_dtype = dtype
        self.out_dtype = self.orig_dtype
        self._w = src.weight.detach().to(dtype).contiguous()

    @property
    def weight(self) -> torch.Tensor:
        """The table in the original dtype (a copy when it is held in another dtype)."""
        return self._w.to(self.orig_dtype)

    def weight_bytes(self) -> int:
        return self._w.numel() * self._w.element_size()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        value = incoming(state_dict, prefix + "weight", self._w, strict, missing_keys, error_msgs)
        if value is None:
            return
        self._w = value.detach().to(self.compute_dtype).contiguous()

    def extra_repr(self) -> str:
        out = "" if self.out_dtype == self.orig_dtype else f", returns {self.out_dtype}"
        return f"{self.num_embeddings}, {self.embedding_dim}, held in {self.compute_dtype}{out}"


class HeldEmbedding(_HeldTable):
    def __init__(self, src: nn.Embedding, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self._init_table(src, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._w, self.padding_idx).to(self.out_dtype)


class HeldEmbeddingBag(_HeldTable):
    def __init__(self, src: nn.EmbeddingBag, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self._init_table(src, dtype)
        self.mode, self.include_last_offset = src.mode, src.include_last_offset

    def forward(self, ids: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.to(self.compute_dtype)
        out = F.embedding_bag(ids, self._w, offsets, mode=self.mode,
                              per_sample_weights=per_sample_weights,
                              include_last_offset=self.include_last_offset,
                              padding_idx=self.padding_idx)
        return out.to(self.out_dtype)


_byte_prepack = torch.ops.quantized.embedding_bag_byte_prepack
_byte_bag = torch.ops.quantized.embedding_bag_byte_rowwise_offsets


class _Int8Table(nn.Module):
    """A table with each row quantized to uint8 with its own fp32 scale and offset (fbgemm's
    8-bit rowwise format, 8 bytes per row of metadata): a lookup reads ~4x fewer bytes than
    fp32. torch's quantized embedding-bag kernel sums rows; mean divides by the bag sizes."""

    def _init_table(self, src: nn.Module):
        self.num_embeddings, self.embedding_dim = src.num_embeddings, src.embedding_dim
        self.padding_idx = src.padding_idx
        self.orig_dtype = src.weight.dtype
        w = src.weight.detach().float().contiguous()
        if self.padding_idx is not None and isinstance(self, Int8EmbeddingBag):
            # bags skip padding entries: a zero row (scale 0) adds nothing to a sum
            w = w.clone()
            w[self.padding_idx] = 0
        self._w = _byte_prepack(w)  # (rows, dim + 8) uint8

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, a fresh float copy."""
        return torch.ops.quantized.embedding_bag_byte_unpack(self._w).to(self.orig_dtype)

    def weight_bytes(self) -> int:
        return self._w.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed_weight": self._w}

    def describe(self) -> dict:
        return {"kind": "embedding_bag" if isinstance(self, Int8EmbeddingBag) else "embedding"}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "packed_weight"] = self._w

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        refuse_int8_load(self, state_dict, prefix, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rowwise"


class Int8Embedding(_Int8Table):
    def __init__(self, src: nn.Embedding):
        super().__init__()
        self._init_table(src)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        offsets = torch.arange(flat.numel(), dtype=flat.dtype)  # one row per "bag"
        out = _byte_bag(self._w, flat, offsets, False, 0, False, None, None, False)
        return out.reshape(*ids.shape, self.embedding_dim).to(self.orig_dtype)

    def reference_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Int8EmbeddingBag(_Int8Table):
    MODES = ("sum", "mean")

    def __init__(self, src: nn.EmbeddingBag):
        super().__init__()
        if src.mode not in self.MODES:
            raise ValueError(f"mode={src.mode!r}: the int8 kernel supports {self.MODES}")
        self._init_table(src)
        self.mode, self.include_last_offset = src.mode, src.include_last_offset

    def forward(self, ids: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if ids.dim() == 2:  # (B, L): fixed-size bags
            offsets = torch.arange(0, ids.numel(), ids.shape[1], dtype=ids.dtype)
            ids = ids.reshape(-1)
        elif offsets is None:
            raise ValueError("offsets has to be given when input is 1D")
        offsets = offsets.to(ids.dtype)
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.float()
        out = _byte_bag(self._w, ids, offsets, False, 0, False, per_sample_weights, None,
                        self.include_last_offset)  # (B, dim)
        if self.mode == "mean":
            out = out / self._bag_sizes(ids, offsets, out.shape[0]).unsqueeze(1)
        return out.to(self.orig_dtype)

    def _bag_sizes(self, ids, offsets, bags: int) -> torch.Tensor:
        """Entries per bag (padding entries excluded), at least 1 (an empty bag gives 0)."""
        counted = (ids != self.padding_idx) if self.padding_idx is not None else \
            torch.ones_like(ids, dtype=torch.bool)
        bag_of = torch.bucketize(torch.arange(ids.numel()), offsets[:bags], right=True) - 1
        return torch.zeros(bags).index_add_(0, bag_of, counted.float()).clamp_(min=1)

    def reference_forward(self, ids, offsets=None, per_sample_weights=None):
        return F.embedding_bag(ids, self.weight, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset,
                               padding_idx=self.padding_idx)
