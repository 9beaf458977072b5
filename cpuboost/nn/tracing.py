"""``torch.jit.trace`` (and ``torch.jit.freeze``) of a cpuboost model: IPEX's usual flow,
``model = optimize(model); model = torch.jit.freeze(torch.jit.trace(model, x))``.

The tracer records every tensor a layer holds outside its parameters and buffers as a constant
of the traced graph, and a oneDNN-packed weight (an opaque tensor without storage) cannot be
one: the trace failed with "Unsupported value kind: Tensor". So while tracing, a layer whose
kernel takes such a weight records its reference computation instead (aten ops on the dense
weight: the original model's arithmetic, at stock PyTorch speed), and says so once per kind of
layer. Layers on cpuboost's own kernels hold dense packed weights and record their cpuboost ops
(a traced model calls them without Python in between)."""
from __future__ import annotations

import contextlib
import warnings

import torch

_warned: set[str] = set()


def traces_reference(module) -> bool:
    """Whether ``module`` is being traced and holds an opaque (oneDNN-packed) weight, so must
    record its reference computation. Warns once per kind of layer."""
    if torch._C._get_tracing_state() is None:
        return False
    held = getattr(module, "_w", None)
    if not (isinstance(held, torch.Tensor) and held.is_mkldnn):
        return False
    kind = type(module).__name__
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(
            f"torch.jit.trace: cpuboost's {kind} layers hold oneDNN-packed weights, which a "
            "TorchScript graph cannot hold; they are traced as their plain aten ops (same "
            "results, stock PyTorch speed for those layers). For cpuboost's speed in a compiled "
            "form, use cpuboost.optimize(model, graph_mode=True) (or quantize(..., "
            "graph_mode=True)), or cpuboost.export() for a deployable package.", stacklevel=3)
    return True


@contextlib.contextmanager
def untraced():
    """Ops run inside are not recorded by an active ``torch.jit.trace`` (the work optimize()
    defers to the first call: recording and checking the model must not end up in the trace)."""
    state = torch._C._get_tracing_state()
    if state is None:  # nothing to step out of (and setting it is refused inside some scopes)
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


__all__ = ["traces_reference", "untraced"]
