"""bf16/fp16: run the model's own (non-packed) ops under CPU autocast.

Packed modules hold their weights in the low-precision dtype and return it, exactly as autocast's
linear/conv do; every other op sees the same dtypes it would under the user's own
``torch.autocast("cpu")``, so outputs have the dtypes autocast gives. Hooks on the modules that
compute (not only the root) mean custom methods and direct submodule calls are covered too.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.embedding import _HeldTable
from cpuboost.nn.fused import _Fused
from cpuboost.passes._context import PassContext


class AutocastScope:
    """Enter CPU autocast in a module's pre-hook, leave it in its (always-called) post-hook.
    Nested modules find autocast already on and do nothing, so the cost is one check."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._local = threading.local()

    def __getstate__(self):
        return {"dtype": self.dtype}

    def __setstate__(self, state):
        self.__init__(state["dtype"])

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def enter(self, module, args):
        stack = self._stack()
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == self.dtype:
            stack.append(None)
        else:
            ctx = torch.autocast("cpu", dtype=self.dtype)
            ctx.__enter__()
            stack.append(ctx)

    def exit(self, module, args, output):
        ctx = self._stack().pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)


# Leaf modules whose ops autocast leaves alone (checked: same output dtype with or without it).
_AUTOCAST_NEUTRAL = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm,
                     nn.modules.batchnorm._BatchNorm)


def _computes_outside_packed(m: nn.Module) -> bool:
    if isinstance(m, (_Fused, FoldedBatchNorm, _HeldTable)) or type(m) in _AUTOCAST_NEUTRAL:
        return False
    has_own_state = any(True for _ in m.parameters(recurse=False)) or any(
        True for _ in m.buffers(recurse=False))
    return has_own_state or next(m.children(), None) is not None


def autocast_scope(model: nn.Module, ctx: PassContext) -> nn.Module:
    dtype = ctx.config.compute_dtype
    scope = AutocastScope(dtype)
    count = 0
    for m in model.modules():
        if _computes_outside_packed(m):
            m.register_forward_pre_hook(scope.enter)
            m.register_forward_hook(scope.exit, always_call=True)
            count += 1
    ctx.record.apply(f"{count} module(s) run under torch.autocast('cpu', {dtype})")
    return model
