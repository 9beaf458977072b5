"""cpuboost's attention function, registered in transformers' attention interface as
``"cpuboost_sdpa"`` when a model dispatches through it. Three paths:

- a beam cache's decode step (the prompt's keys riding on the key tensor): two-part flash
  attention merged by log-sum-exp (``beam.beam_step``);
- any other decode step (one query position): torch's CPU flash kernel spends ~140 us per call
  on 32 query heads over 80 cached positions and ~1 ms over 600 (it parallelises poorly with one
  query row per head). Query heads sharing a key/value head become that head's query rows
  (exact: a single position needs no causal mask): 8-15x faster for grouped-query attention.
  Without grouping (one key head per query head) a plain fp32 softmax(QK^T)V is 1.1-4.6x faster
  from 64 cached positions on; below that flash is kept;
- everything else (prefill, options the fast paths do not handle): transformers' SDPA function.
"""
from __future__ import annotations

import torch

NAME = "cpuboost_sdpa"
MATH_FROM = 64  # cached positions from which the fp32 math path beats flash (no grouping)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool (True = attend) or float mask as an additive fp32 mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))
    return mask.float()


def decode_attention(query, key, value, mask, scaling):
    """One query position: (n, heads, 1, d) against (n, kv_heads, L, d) -> (n, 1, heads, d)."""
    n, heads, _, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    if mask is not None and mask.shape[1] != 1:  # per-head mask: rows follow their heads
        mask = mask.reshape(n, kv_heads, groups, length)
    else:
        mask = None if mask is None else mask.reshape(mask.shape[0], 1, 1, length)
    if groups > 1 or length < MATH_FROM:
        q = query.reshape(n, kv_heads, groups, d)
        m = None if mask is None else additive_mask(mask).to(q.dtype)
        out = _flash(q, key, value, 0.0, False, attn_mask=m, scale=scale)[0]
    else:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + additive_mask(mask)
        out = torch.matmul(torch.softmax(scores, -1), value.float()).to(query.dtype)
    return out.reshape(n, heads, 1, d).transpose(1, 2).contiguous()


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              is_causal=None, **kwargs):
    """transformers' attention-function signature; returns (output (n, q, heads, d), None)."""
    if query.shape[2] == 1:
        if getattr(key, "_cpuboost_prefix", None) is not None:
            from cpuboost.llm.beam import beam_step
            return beam_step(query, key, value, attention_mask, scaling), None
        plain = dropout == 0.0 and not kwargs.get("output_attentions") and \
            kwargs.get("softcap") is None and kwargs.get("position_bias") is None and \
            kwargs.get("s_aux") is None and query.shape[1] % key.shape[1] == 0
        if plain:
            return decode_attention(query, key, value, attention_mask, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register() -> None:
    """Add ``"cpuboost_sdpa"`` to transformers' attention and mask registries (an addition:
    nothing existing changes). Done by optimize(), never at import."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
