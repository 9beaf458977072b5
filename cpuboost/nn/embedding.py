"""Embedding / EmbeddingBag holding their table in bf16 (or fp16).

A lookup reads whole rows from memory that is rarely in cache (DLRM's tables are 200 MB), so
half the bytes per row is most of the gain. The result is returned in the original dtype,
which is what torch.autocast gives for embedding ops, so downstream dtypes do not change.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cpuboost.nn._state import incoming


class _HeldTable(nn.Module):
    def _init_table(self, src: nn.Module, dtype: torch.dtype):
        self.num_embeddings, self.embedding_dim = src.num_embeddings, src.embedding_dim
        self.padding_idx = src.padding_idx
        self.orig_dtype = src.weight.dtype
        self.compute_dtype = dtype
        self._w = src.weight.detach().to(dtype).contiguous()

    @property
    def weight(self) -> torch.Tensor:
        """A fresh copy in the original dtype, for code that reads ``.weight``."""
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
        self._w = value.to(self.compute_dtype).contiguous()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, held in {self.compute_dtype}"


class LowPrecisionEmbedding(_HeldTable):
    def __init__(self, src: nn.Embedding, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self._init_table(src, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._w, self.padding_idx).to(self.orig_dtype)


class LowPrecisionEmbeddingBag(_HeldTable):
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
        return out.to(self.orig_dtype)
