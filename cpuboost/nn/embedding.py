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

from cpuboost.nn._state import incoming


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
