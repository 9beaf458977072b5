"""A KV cache that writes each new token into preallocated storage.

transformers' default ``DynamicCache`` appends with ``torch.cat`` at every step, copying the whole
cache of every layer once per token (at batch 8 and a 512-token prompt on a 1B Llama-style
model that is ~100 MB per token, a fifth of an int4 model's weight traffic). Here each layer owns
buffers of shape (batch, kv_heads, capacity, head_dim); a step writes its slot and attention
reads a view of the filled part. Capacity is the ``generate()`` call's total length (or
``max_seq_len``); running past it doubles the buffer once, never per token.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def cache_argument(model) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``cache`` (transformers 5.2x,
    which warns that ``past_key_values`` is deprecated) or ``past_key_values``."""
    import inspect
    forward = type(model).forward  # (not a stand-in optimize put in front of it)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views into preallocated buffers."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self._k = self._v = None  # (batch, heads, capacity, head_dim)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None

    def _owns(self, n: int, total: int, key_states: torch.Tensor) -> bool:
        """True if the filled part sits at the start of buffers with room for ``total``."""
        if self._k is None or self._k.shape[-2] < total or self._k.shape[0] != key_states.shape[0]:
            return False
        return n == 0 or self.keys.data_ptr() == self._k.data_ptr()

    def _reallocate(self, n: int, total: int, key_states, value_states) -> None:
        # first call, running past capacity (doubles), or after a batch reshuffle
        grown = 2 * self._k.shape[-2] if (self._k is not None and n) else 0
        cap = max(total, self.capacity, grown)
        self._k, self._v = (torch.empty(*t.shape[:2], cap, t.shape[-1], dtype=t.dtype,
                                        device=t.device) for t in (key_states, value_states))
        if n:
            self._k[:, :, :n].copy_(self.keys)
            self._v[:, :, :n].copy_(self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self._filled()
        total = n + key_states.shape[-2]  # keys: (batch, kv_heads, total, head_dim)
        if not self._owns(n, total, key_states):
            self._reallocate(n, total, key_states, value_states)
        self._k[:, :, n:total].copy_(key_states)
        self._v[:, :, n:total].copy_(value_states)
        self.keys, self.values = self._k[:, :, :total], self._v[:, :, :total]
        return self.keys, self.values

    def _filled(self) -> int:
        """Positions held in this layer's own buffers."""
        if not self.is_initialized or self.keys is None or self.keys.dim() != 4:
            return 0
        return self.keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: gather the chosen beams' rows back into the same buffers (no new
        allocation beyond the gathered rows)."""
        if self._filled() == 0:
            return
        idx = beam_idx.to(self.keys.device)
        n = self.keys.shape[-2]
        self._k[:, :, :n].copy_(self.keys.index_select(0, idx))
        self._v[:, :, :n].copy_(self.values.index_select(0, idx))

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None


class PreallocatedCache(DynamicCache):
    """``DynamicCache`` (same layer structure from the model config) whose full-attention
    layers are ``PreallocatedLayer``s (or ``beam.BeamLayer``s for beam search with
    ``beams > 1``); sliding-window layers keep transformers' own."""

    def __init__(self, config=None, capacity: int = 0, beams: int = 1):
        super().__init__(config=config)

        def make():
            if beams > 1:
                from cpuboost.llm.beam import BeamLayer
                return BeamLayer(capacity, beams)
            return PreallocatedLayer(capacity)

        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = make
        self.layers = [make() if type(layer) is DynamicLayer else layer for layer in self.layers]


class _PrepareCache:
    """Stands for the model's ``_prepare_cache_for_generation``: ``generate()``'s own cache
    set-up, then the default DynamicCache swapped for ours (a cache the user passed, or any
    other cache implementation, is left alone). An object, not a bound method, so the model
    still pickles and deep-copies."""

    def __init__(self, model, max_seq_len, beam_cache: bool):
        self.model, self.max_seq_len, self.beam_cache = model, max_seq_len, beam_cache

    def __call__(self, generation_config, model_kwargs, generation_mode, batch_size,
                 max_cache_length):
        model = self.model
        type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs,
                                                  generation_mode, batch_size,
                                                  max_cache_length)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            capacity = max(max_cache_length, self.max_seq_len or 0)
            beams = generation_config.num_beams if self.beam_cache else 1
            model_kwargs["cache"] = PreallocatedCache(
                config=model.config.get_text_config(decoder=True), capacity=capacity,
                beams=beams or 1)


def use_preallocated_cache(model, max_seq_len, beam_cache: bool = False) -> bool:
    """Make ``model.generate`` use PreallocatedCache (with the prompt held once per request
    in beam search if ``beam_cache``); False if its generate() builds no transformers cache."""
    if not hasattr(type(model), "_prepare_cache_for_generation"):
        return False
    object.__setattr__(model, "_prepare_cache_for_generation",
                       _PrepareCache(model, max_seq_len, beam_cache))
    return True
