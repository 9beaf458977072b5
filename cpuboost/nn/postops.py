"""Elementwise activations oneDNN can apply inside a conv/linear call, and how to spot them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PostOp:
    name: str
    attr: str  # oneDNN post-op attribute as torch.ops.mkldnn names it
    algorithm: str = ""
    scalars: tuple = field(default=())
    reference: Callable[[torch.Tensor], torch.Tensor] = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.name


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _gelu_tanh(y: torch.Tensor) -> torch.Tensor:
    return F.gelu(y, approximate="tanh")


POST_OPS = {
    "none": PostOp("none", "none", reference=_identity),
    "relu": PostOp("relu", "relu", reference=F.relu),
    "gelu": PostOp("gelu", "gelu", "none", reference=F.gelu),
    "gelu_tanh": PostOp("gelu_tanh", "gelu", "tanh", reference=_gelu_tanh),
    "silu": PostOp("silu", "swish", reference=F.silu),
    "sigmoid": PostOp("sigmoid", "sigmoid", reference=torch.sigmoid),
    "tanh": PostOp("tanh", "tanh", reference=torch.tanh),
    "hardswish": PostOp("hardswish", "hardswish", reference=F.hardswish),
}

class PostOpHolder:
    """Mixin for modules applying a fused post-op: stored by name (so the module pickles),
    unpacked into plain attributes for the per-call path (no property or dict lookups there)."""

    @property
    def post_op(self) -> PostOp:
        return POST_OPS[self.post_op_name]

    @post_op.setter
    def post_op(self, op: PostOp) -> None:
        self.post_op_name = op.name
        self._attr, self._scalars, self._algo = op.attr, list(op.scalars), op.algorithm


_BY_CLASS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
             nn.Hardswish: "hardswish"}


def _probe() -> torch.Tensor:
    # A dense sweep over where these functions differ, plus extremes.
    return torch.cat([torch.linspace(-12, 12, 4801), torch.tensor([-80.0, 80.0, 0.0, 1e-6])])


def identify(module: nn.Module) -> Optional[PostOp]:
    """The post-op a parameterless activation module computes, or None.

    torch.nn classes are known by class; any other parameter-free module (a library's own GELU,
    say) is identified by what it computes on a probe, so no library's class names are needed.
    """
    if type(module) in _BY_CLASS:
        return POST_OPS[_BY_CLASS[type(module)]]
    if type(module) is nn.GELU:
        return POST_OPS["gelu_tanh" if module.approximate == "tanh" else "gelu"]
    if type(module).__module__.startswith("torch.nn"):
        return None  # a torch module not listed above is not one of ours
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None
    x = _probe()
    try:
        with torch.no_grad():
            y = module(x.clone())
    except Exception:  # not an elementwise module of one tensor: simply not a post-op
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    for op in POST_OPS.values():
        if op.name == "none":
            continue
        ref = op.reference(x)
        if torch.allclose(y, ref, rtol=1e-5, atol=1e-6):
            return op
    return None


