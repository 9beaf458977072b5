"""Beam search without copying the prompt's KV cache.

Every beam of a request starts from the same prompt, so its keys and values are the same for all
beams. ``BeamLayer`` keeps them once per request (the ``prefix``) and only the generated
positions per beam. Reordering beams after a step then moves only the generated positions
(tens of tokens), never the prompt (hundreds), and the prompt's cache takes 1/beams of the
memory. Attention is computed in two parts with torch's CPU flash kernel, which also returns
each row's log-sum-exp, and the parts are merged exactly:
``out = (o1 * e^lse1 + o2 * e^lse2) / (e^lse1 + e^lse2)``.

That needs the model's attention to run through transformers' attention interface, where
cpuboost's attention function (``attention.py``, registered as ``"cpuboost_sdpa"``) sees the
prefix riding on the key tensor and calls ``beam_step``. A
step whose attention did not consume it raises instead of returning a wrong result, and
``optimize`` enables the split only after a probe generation matched the plain cache.
"""
from __future__ import annotations

import torch

from cpuboost.llm.cache import PreallocatedLayer

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class PrefixNotConsumed(RuntimeError):
    """The model read the beam cache without cpuboost's attention function."""


class BeamLayer(PreallocatedLayer):
    def __init__(self, capacity: int = 0, beams: int = 1):
        super().__init__(capacity)
        self.beams = beams
        self.prefix = None  # (keys, values): (batch, kv_heads, prompt, head_dim)
        self._pending = None  # the key tensor handed out with the prefix, until attention uses it

    def get_seq_length(self) -> int:
        return (self.prefix[0].shape[-2] if self.prefix else 0) + self._filled()

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None and not getattr(self._pending, "_cpuboost_used", False):
            raise PrefixNotConsumed(
                "this model's attention read the beam-search cache without cpuboost's "
                "attention function, so it saw only the generated positions. Optimize it "
                "with cpuboost.llm.optimize(..., beam_cache=False).")
        self._pending = None
        first = not self.is_initialized and self.prefix is None
        if first and self.beams > 1 and key_states.shape[0] % self.beams == 0:
            # prompt: every beam of a request holds the same rows; keep one of each
            self.prefix = (key_states[::self.beams].contiguous(),
                           value_states[::self.beams].contiguous())
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        if self.prefix is None or key_states.shape[-2] != 1:
            self._merge_prefix()
            return super().update(key_states, value_states, *args, **kwargs)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        keys = keys.view(keys.shape)  # a fresh view object to carry the prefix
        keys._cpuboost_prefix = (self.prefix, self.beams)
        self._pending = keys
        return keys, values

    def _merge_prefix(self) -> None:
        """Back to one cache per beam (a multi-token step, cropping, batch reshuffles)."""
        if self.prefix is None:
            return
        pk, pv = (t.repeat_interleave(self.beams, dim=0) for t in self.prefix)
        n = self._filled()
        if n:
            pk, pv = torch.cat([pk, self.keys], dim=-2), torch.cat([pv, self.values], dim=-2)
        self.prefix, self.keys, self.values, self._k, self._v = None, pk, pv, None, None

    def crop(self, tokens_to_remove: int) -> None:
        self._merge_prefix()
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._merge_prefix()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._merge_prefix()
        super().batch_select_indices(indices)

    def reset(self) -> None:
        super().reset()
        self.prefix = self._pending = None


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(n, heads, 1, d) -> (n, kv_heads, heads / kv_heads, d): query heads sharing a key head
    become that head's query rows (a single position needs no causal mask)."""
    n, heads, _, d = q.shape
    return q.reshape(n, kv_heads, heads // kv_heads, d)


def _part(q, k, v, mask, scale):
    """Flash attention of one part: (output (fp32), log-sum-exp per row)."""
    out, lse = _flash(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
    return out.float(), lse.float().unsqueeze(-1)


def _split_mask(mask, prompt: int, beams: int, rows: int):
    """The (batch*beams, 1, 1, kv) decode mask -> additive float masks for the prompt part
    (one row per request) and the generated part (per beam), or None where all is visible."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))
    mask = mask.float()
    m_prompt = mask[::beams, :, :, :prompt]  # (batch, 1, 1, prompt)
    m_gen = mask[:, :, :, prompt:]
    return m_prompt.expand(-1, -1, rows, -1), m_gen


def beam_step(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """A beam cache's decode step: attention over the request's prompt part and the beam's
    generated part, merged exactly. Returns (n, 1, heads, d)."""
    (pk, pv), beams = key._cpuboost_prefix
    key._cpuboost_used = True
    n, heads, _, d = query.shape  # n = batch * beams, one query position
    batch, kv_heads, prompt, _ = pk.shape
    groups = heads // kv_heads
    dtype = query.dtype
    m_prompt, m_gen = _split_mask(attention_mask, prompt, beams, beams * groups)
    # prompt part: the beams (and grouped heads) of a request are its query rows
    qp = _grouped(query, kv_heads).reshape(batch, beams, kv_heads, groups, d)
    qp = qp.transpose(1, 2).reshape(batch, kv_heads, beams * groups, d)
    o1, l1 = _part(qp, pk, pv, None if m_prompt is None else m_prompt.to(dtype), scaling)
    o1 = o1.reshape(batch, kv_heads, beams, groups, d).transpose(1, 2).reshape(
        n, kv_heads, groups, d)
    l1 = l1.reshape(batch, kv_heads, beams, groups, 1).transpose(1, 2).reshape(
        n, kv_heads, groups, 1)
    # generated part: per beam
    o2, l2 = _part(_grouped(query, kv_heads), key, value,
                   None if m_gen is None else m_gen.to(dtype), scaling)
    top = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    out = (o1 * w1 + o2 * w2) / (w1 + w2)  # (n, kv_heads, groups, d)
    return out.reshape(n, heads, 1, d).transpose(1, 2).to(dtype).contiguous()


def probe(model) -> str | None:
    """None if a beam decode step through the split cache matches the plain cache on this
    model (two beams, one request, different next tokens), else why it does not."""
    import inspect
    from cpuboost.llm.cache import PreallocatedCache
    config = model.config.get_text_config(decoder=True)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    ids = torch.arange(3, 9).remainder(config.vocab_size).repeat(2, 1)  # (2 beams, 6)
    step = torch.tensor([[1], [2]]).remainder(config.vocab_size)

    def decode(cache):
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{name: cache})
            return model(input_ids=step, use_cache=True, **{name: cache}).logits.float()

    split = PreallocatedCache(config=config, capacity=8, beams=2)
    try:
        got, want = decode(split), decode(PreallocatedCache(config=config, capacity=8))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the split cache
        return f"a probe beam step failed ({type(e).__name__}: {e})"
    layers = [layer for layer in split.layers if isinstance(layer, BeamLayer)]
    if not layers or any(layer.prefix is None for layer in layers):
        return "its cache layers were not used as beam caches"
    if any(not getattr(layer._pending, "_cpuboost_used", False) for layer in layers):
        return "its attention does not run through transformers' attention interface"
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    # a broken split is off by O(1); two correct orders of rounding differ by up to a few
    # percent in 16-bit after many layers (2.2% on a 22-layer bf16 Llama with random weights)
    low_precision = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    if err > (8e-2 if low_precision else 1e-3):
        return f"a probe beam step differed from the plain cache (relative {err:.2g})"
    return None
