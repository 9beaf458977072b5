"""Static int8 layers that read the same input with the same qparams (an attention's Q, K and
V projections) quantize it once per call: the first of them to run does, the others reuse it."""
from __future__ import annotations

import weakref
from typing import Callable

import torch


class SharedInput:
    """The uint8 form of one float input that several static int8 linears with the same input
    qparams read (an attention's Q, K and V projections read the same hidden states): the
    first of them to run in a call quantizes it, the others reuse that. Matched by identity and
    version counter, so a tensor changed in place (or a new one at the same address) is
    quantized again; inference tensors (``torch.inference_mode``) have no version counter and
    are always quantized by each layer. The uint8 tensor is let go once every sibling has read
    it. Safe across threads (multi-stream): the entry is one tuple, read once and replaced."""

    def __init__(self, group: int, size: int):
        self.group, self.size = group, size  # group: saved with each member (save_quantized)
        self._last = None  # (weakref to the float input, its version, uint8 form, reads left)

    def get(self, x: torch.Tensor, quantize: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The uint8 form of ``x``: the one a sibling made for this very tensor, or
        ``quantize()``."""
        if x.is_inference():
            return quantize()
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            left = last[3] - 1
            self._last = (last[0], last[1], last[2], left) if left > 0 else None
            return last[2]
        q = quantize()
        self._last = (weakref.ref(x), x._version, q, self.size - 1)
        return q

    def __getstate__(self):  # pickle / deepcopy: the sharing, not the last input
        return {"group": self.group, "size": self.size}

    def __setstate__(self, state):
        self.group, self.size, self._last = state["group"], state["size"], None


def share_input(layers: list, group: int) -> None:
    """Let ``layers`` (static int8 layers reading the same input with the same qparams) quantize
    it once per call. ValueError if their input quantization differs (they cannot share)."""
    forms = {(m.dynamic, m.smooth is None, m.x_scale, m.x_zp, m.qmax) for m in layers}
    if len(forms) != 1 or next(iter(forms))[:2] != (False, True):
        raise ValueError(f"int8 layers of input group {group} do not quantize their input the "
                         f"same way (static, unsmoothed, same scale and zero point): {forms}")
    shared = SharedInput(group, len(layers))
    for layer in layers:
        layer.shared_input = shared


__all__ = ["SharedInput", "share_input"]
