"""Is a Linear subclass with its own ``forward`` still a Linear?

Packing or quantizing a Linear replaces its ``forward`` with ``F.linear`` on another form of the
weight. For a subclass that overrides ``forward`` that is right only if its forward computes
``F.linear`` too, as transformers' ``FalconLinear`` does (``input @ self.weight.T + bias``, so
that cpuboost.optimize left every Falcon linear alone). Whether it does is observed, not
assumed from the class: the module is run on a probe input and compared with ``F.linear``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# matmul + add and addmm round differently; a forward doing anything else (a scale, an
# activation, a LoRA term, a transposed weight) is off by far more than this
_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def why_not_plain_linear(m: nn.Linear) -> Optional[str]:
    """None if ``m`` computes ``F.linear(x, m.weight, m.bias)``, else why it does not."""
    kind = type(m)
    if kind.forward is nn.Linear.forward:
        return None
    name = f"{kind.__name__} overrides Linear.forward"
    extra = ({n for n, _ in m.named_parameters(recurse=False)}
             | {n for n, _ in m.named_buffers(recurse=False)}) - {"weight", "bias"}
    if extra or next(m.children(), None) is not None:
        return f"{name} and holds more than weight and bias"
    rtol = _RTOL.get(m.weight.dtype)
    if rtol is None:
        return f"{name} (weight dtype {m.weight.dtype})"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, m.in_features, generator=g).to(m.weight.dtype)  # (B, T, in)
    with torch.no_grad():
        try:
            got = kind.forward(m, x)  # the class's forward: no hooks
        except Exception as e:  # the probe is ours, not the user's input: not their error
            return f"{name}, which raised {type(e).__name__} on a probe input"
        want = F.linear(x, m.weight, m.bias)
    same = (isinstance(got, torch.Tensor) and got.shape == want.shape
            and got.dtype == want.dtype
            and torch.allclose(got.float(), want.float(), rtol=rtol,
                               atol=rtol * float(want.abs().max().clamp_min(1e-30))))
    return None if same else f"{name} with a forward that is not F.linear (checked on a probe)"
