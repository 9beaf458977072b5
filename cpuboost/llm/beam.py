"""Beam search that never moves the KV cache.

Every beam of a request starts from the same prompt, so ``BeamLayer`` keeps the prompt's keys
and values once per request (the ``prefix``). Each generated step writes one slot per beam,
``(request, kv_heads, step * beams + beam, head_dim)``, and nothing is moved afterwards: beam
reordering only permutes a small table, ``history[row, step]`` = the beam whose slot at that
step lies on the row's path (IPEX's indirect-access idea, without a custom kernel). A decode
step attends over two parts with torch's CPU flash kernel, which also returns each row's
log-sum-exp, and merges them exactly, ``out = (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2)``:
the prompt part, with a request's beams (and grouped query heads) as query rows; and the
generated part, every slot of the request as keys, masked to the row's own path. The generated
part costs beams-times the attention of one path (tens of positions) instead of a copy of every
beam's cache per step.

That needs the model's attention to run through transformers' attention interface, where
cpuboost's attention function (``attention.py``, registered as ``"cpuboost_sdpa"``) sees the
parts riding on the key tensor and calls ``beam_step``. A step whose attention did not consume
them raises instead of returning a wrong result, and ``optimize`` enables the cache only after
a probe step matched the plain cache.
"""
from __future__ import annotations

import torch

from cpuboost.llm.attention import additive_mask
from cpuboost.llm.cache import PreallocatedLayer
from cpuboost.passes._context import ForwardStandIn

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class PrefixNotConsumed(RuntimeError):
    """The model read the beam cache without cpuboost's attention function."""


class BeamLayer(PreallocatedLayer):
    def __init__(self, capacity: int = 0, beams: int = 1):
        super().__init__(capacity)
        self.beams = beams
        self.prefix = None  # (keys, values): (requests, kv_heads, prompt, head_dim)
        self._slots = None  # (keys, values): (requests, kv_heads, steps * beams, head_dim)
        self.history = None  # (requests * beams, steps): the beam whose slot is on each path
        self._steps = 0
        self._pending = None  # the key tensor handed out with the parts, until attention uses it
        self.deduplicated = False  # the next (prompt) update holds one row per request

    def get_seq_length(self) -> int:
        if self.prefix is not None:
            return self.prefix[0].shape[-2] + self._steps
        return super().get_seq_length()

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None and not getattr(self._pending, "_cpuboost_used", False):
            raise PrefixNotConsumed(
                "this model's attention read the beam-search cache without cpuboost's "
                "attention function, so it saw only the generated positions. Optimize it "
                "with cpuboost.llm.optimize(..., beam_cache=False).")
        self._pending = None
        first = not self.is_initialized and self.prefix is None
        if first and self.deduplicated:  # BeamPrefill ran the prompt once per request
            self.deduplicated = False
            self.prefix = (key_states.contiguous(), value_states.contiguous())
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        if first and self.beams > 1 and key_states.shape[0] % self.beams == 0:
            # prompt: every beam of a request holds the same rows; keep one of each
            self.prefix = (key_states[::self.beams].contiguous(),
                           value_states[::self.beams].contiguous())
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        if self.prefix is None or key_states.shape[-2] != 1 or \
                key_states.shape[0] != self.prefix[0].shape[0] * self.beams:
            self._merge_prefix()
            return super().update(key_states, value_states, *args, **kwargs)
        self._write_slots(key_states, value_states)
        n = self._steps * self.beams
        keys, values = self._slots[0][:, :, :n], self._slots[1][:, :, :n]
        keys._cpuboost_prefix = (self.prefix, self.beams, self.history[:, :self._steps])
        self._pending = keys
        return keys, values

    def _write_slots(self, key_states, value_states) -> None:
        rows, kv_heads, _, d = key_states.shape
        requests, beams, step = rows // self.beams, self.beams, self._steps
        cap = self._slots[0].shape[-2] // beams if self._slots is not None else 0
        if step + 1 > cap:  # first step, or past capacity: allocate (doubling), keep content
            prompt = self.prefix[0].shape[-2]
            new_cap = max(step + 1, self.capacity - prompt, 2 * cap, 8)
            slots = tuple(torch.empty(requests, kv_heads, new_cap * beams, d, dtype=t.dtype)
                          for t in (key_states, value_states))
            history = torch.empty(rows, new_cap, dtype=torch.long)
            if step:
                for new, old in zip(slots, self._slots):
                    new[:, :, :step * beams].copy_(old[:, :, :step * beams])
                history[:, :step].copy_(self.history[:, :step])
            self._slots, self.history = slots, history
        for buf, new in zip(self._slots, (key_states, value_states)):
            buf[:, :, step * beams:(step + 1) * beams].copy_(
                new.reshape(requests, beams, kv_heads, d).transpose(1, 2))
        self.history[:, step] = torch.arange(rows) % beams  # each beam's own slot
        self._steps += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reorder: only the path table moves, never keys or values."""
        if self.prefix is None:
            return super().reorder_cache(beam_idx)
        if self._steps:
            self.history[:, :self._steps] = self.history[beam_idx, :self._steps]

    def _paths(self, slots: torch.Tensor) -> torch.Tensor:
        """Each row's own generated keys (rows, kv_heads, steps, d), gathered along its path."""
        requests, kv_heads, _, d = slots.shape
        rows, steps = requests * self.beams, self._steps
        grid = slots[:, :, :steps * self.beams].reshape(requests, kv_heads, steps, self.beams, d)
        req = torch.arange(rows) // self.beams
        picked = grid[req[:, None], :, torch.arange(steps)[None, :], self.history[:, :steps]]
        return picked.permute(0, 2, 1, 3)  # (rows, steps, kv_heads, d) -> (rows, kv, steps, d)

    def _merge_prefix(self) -> None:
        """Back to one plain cache per beam (a multi-token step, cropping, batch reshuffles)."""
        if self.prefix is None:
            return
        pk, pv = (t.repeat_interleave(self.beams, dim=0) for t in self.prefix)
        if self._steps:
            pk = torch.cat([pk, self._paths(self._slots[0])], dim=-2)
            pv = torch.cat([pv, self._paths(self._slots[1])], dim=-2)
        self.prefix = self._slots = self.history = None
        self._steps = 0
        self.keys, self.values, self._k, self._v = pk.contiguous(), pv.contiguous(), None, None

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
        self.prefix = self._slots = self.history = self._pending = None
        self._steps = 0


_PER_ROW = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


class BeamPrefill(ForwardStandIn):
    """Stands for the model's ``forward`` when beam search uses ``BeamLayer`` caches:
    ``generate()`` repeats every prompt once per beam before the first forward, so the prompt
    would be computed ``beams`` times. If all rows of each request are identical, the prompt
    runs once per request and the logits are repeated per beam. Any other call goes to the
    model's own forward unchanged. An object, so the model still pickles and deep-copies."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        forward = type(model).forward
        layers = getattr(kwargs.get("cache", kwargs.get("past_key_values")), "layers", None)
        if args or not layers or kwargs.get("output_hidden_states") or \
                kwargs.get("output_attentions") or not all(
                    isinstance(layer, BeamLayer) and not layer.is_initialized and
                    layer.prefix is None for layer in layers):
            return forward(model, *args, **kwargs)
        beams = layers[0].beams
        rows = [kwargs[k] for k in _PER_ROW if isinstance(kwargs.get(k), torch.Tensor)]
        n = rows[0].shape[0] if rows else 0
        unknown = [k for k, v in kwargs.items() if k not in _PER_ROW and
                   isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n]
        if beams < 2 or not rows or unknown or any(not _repeated(t, beams) for t in rows):
            return forward(model, *args, **kwargs)  # e.g. per-row inputs it does not know
        once = {k: (v[::beams] if k in _PER_ROW and isinstance(v, torch.Tensor) else v)
                for k, v in kwargs.items()}
        for layer in layers:
            layer.deduplicated = True
        try:
            out = forward(model, **once)
        finally:
            for layer in layers:
                layer.deduplicated = False
        out.logits = out.logits.repeat_interleave(beams, dim=0)
        return out


def _repeated(t: torch.Tensor, beams: int) -> bool:
    """True if rows come in groups of ``beams`` identical rows."""
    n = t.shape[0]
    if n % beams:
        return False
    grouped = t.reshape(n // beams, beams, *t.shape[1:])
    return bool((grouped == grouped[:, :1]).all())


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
    """The (requests*beams, 1, 1, kv) decode mask -> additive float masks for the prompt part
    (one row per request) and the generated positions (per beam), or None where all is
    visible."""
    if mask is None:
        return None, None
    mask = additive_mask(mask)
    m_prompt = mask[::beams, :, :, :prompt]  # (requests, 1, 1, prompt)
    m_gen = mask[:, 0, 0, prompt:]  # (rows, steps)
    return m_prompt.expand(-1, -1, rows, -1), m_gen


def _path_mask(history: torch.Tensor, m_gen, beams: int, groups: int) -> torch.Tensor:
    """Additive mask of the generated part: row (request, beam, group) sees slot (step, j) only
    if beam j's token at that step is on its path. (requests, 1, beams * groups, steps * beams)"""
    rows, steps = history.shape
    on_path = history[:, :, None] == torch.arange(beams)  # (rows, steps, beams)
    mask = torch.zeros(on_path.shape).masked_fill(~on_path, float("-inf"))
    if m_gen is not None:
        mask = mask + m_gen[:, :, None]
    mask = mask.reshape(rows // beams, beams, 1, steps * beams)
    return mask.expand(-1, -1, groups, -1).reshape(rows // beams, 1, beams * groups, -1)


def _rows(x: torch.Tensor, requests: int, beams: int) -> torch.Tensor:
    """(requests, kv_heads, beams * groups, ...) -> (requests * beams, kv_heads, groups, ...)"""
    _, kv_heads, _, *rest = x.shape
    return x.reshape(requests, kv_heads, beams, -1, *rest).transpose(1, 2).reshape(
        requests * beams, kv_heads, -1, *rest)


def beam_step(query, key, value, attention_mask, scaling) -> torch.Tensor:
    """A beam cache's decode step: attention over the request's prompt part and over its
    generated slots masked to each beam's path, merged exactly. Returns (rows, 1, heads, d)."""
    (pk, pv), beams, history = key._cpuboost_prefix
    key._cpuboost_used = True
    n, heads, _, d = query.shape  # n = requests * beams, one query position
    requests, kv_heads, prompt, _ = pk.shape
    groups = heads // kv_heads
    dtype = query.dtype
    m_prompt, m_gen = _split_mask(attention_mask, prompt, beams, beams * groups)
    # a request's beams (and grouped heads) are its query rows, for both parts
    q = _grouped(query, kv_heads).reshape(requests, beams, kv_heads, groups, d)
    q = q.transpose(1, 2).reshape(requests, kv_heads, beams * groups, d)
    o1, l1 = _part(q, pk, pv, None if m_prompt is None else m_prompt.to(dtype), scaling)
    o2, l2 = _part(q, key, value, _path_mask(history, m_gen, beams, groups).to(dtype), scaling)
    top = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    out = _rows((o1 * w1 + o2 * w2) / (w1 + w2), requests, beams)  # (n, kv_heads, groups, d)
    return out.reshape(n, heads, 1, d).transpose(1, 2).to(dtype).contiguous()


def probe(model) -> str | None:
    """None if a beam decode step through the split cache matches the plain cache on this
    model (two beams, one request, different next tokens), else why it does not."""
    from cpuboost.llm.cache import PreallocatedCache, cache_argument
    config = model.config.get_text_config(decoder=True)
    name = cache_argument(model)
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
