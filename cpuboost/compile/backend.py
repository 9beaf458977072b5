"""The `cpuboost` torch.compile backend: Inductor with the CPU fast path, configured per call.

``torch.compile(model, backend="cpuboost")`` finds it through the ``torch_dynamo_backends``
entry point, so it works without ``import cpuboost``; importing cpuboost registers nothing.
Every Inductor setting it needs is applied only while it compiles (``config.patch`` restores
them), and custom passes another library installed stay in place: ours is appended to theirs.

Freezing (weights become constants that oneDNN packs once) is decided by Dynamo *while tracing*,
before any backend runs, from ``torch._inductor.config.freezing``. So the first call — the one
that traces — must run inside :func:`scope` for the fast path::

    compiled = torch.compile(model, backend="cpuboost")
    with torch.no_grad(), cpuboost.compile.scope():
        compiled(x)          # traces + compiles with freezing
    compiled(x)              # later calls need no scope

Without it the backend still compiles correctly, like stock Inductor without freezing.
"""
from __future__ import annotations

import contextlib

import torch

from cpuboost._memory import release_freed_memory
from cpuboost.compile.conv_pack import quiet_unpicklable_constants
from cpuboost.compile.graph_passes import OneDnnLinear, onednn_where_faster
from cpuboost.compile.shared_constants import shared_folding


def _chained(existing, ours: OneDnnLinear) -> tuple:
    """Others' passes first, then ours (the Linear pass, then attention), once (a surrounding
    scope() may have added them)."""
    passes = () if existing is None else (
        tuple(existing) if isinstance(existing, (list, tuple)) else (existing,))
    if any(isinstance(p, OneDnnLinear) for p in passes):
        return passes
    return (*passes, ours, ours.attention)


@contextlib.contextmanager
def inductor_scope(linear_pass: OneDnnLinear):
    """Inductor settings for CPU inference, restored on exit. Freezing (weights become constants,
    so oneDNN packs them once) measured on ResNet-50 bs1: 0.94x without, 1.51x with (each vs
    eager in its own process). The C++ wrapper (no Python between kernels) measured per forward,
    one process each: ResNet-50 bs1 fp32 44.0 -> 40.6 ms, bf16 26.8 -> 24.3 ms, BERT-base bs1
    bf16 81.7 -> 69.0 ms; it adds 3-6 s of compile time. Entering and leaving costs ~110 us
    (each ``patch`` builds a class), so graph mode enters it only while Dynamo compiles."""
    import torch._inductor.config as cfg
    passes = _chained(cfg.post_grad_custom_pre_pass, linear_pass)
    with cfg.patch(freezing=True, cpp_wrapper=True, post_grad_custom_pre_pass=passes), \
            quiet_unpicklable_constants():
        yield next(p for p in passes if isinstance(p, OneDnnLinear))  # the one in effect


@contextlib.contextmanager
def packing_scope(weight_dtype: torch.dtype = torch.float32):
    """inductor_scope with Inductor's Linear packing routed by the OneDnnLinear pass (cpuboost's
    kernel, oneDNN or MKL per shape): what every cpuboost compile runs in, the backend's and
    export's. Yields the pass in effect, with its counts."""
    with inductor_scope(OneDnnLinear(weight_dtype)) as linear_pass, \
            onednn_where_faster(linear_pass):
        yield linear_pass


@contextlib.contextmanager
def scope():
    """Trace and compile with freezing and cpuboost's graph passes; settings restored on exit."""
    with inductor_scope(OneDnnLinear()):
        yield


def cpuboost_backend(gm: torch.fx.GraphModule, example_inputs):
    """Dynamo backend entry point. Freezing applies to inference (grad disabled); under
    autograd Inductor compiles without it, as it would for the stock backend. Constants folded
    by freezing are shared with the model's other graphs (see shared_constants)."""
    from torch._inductor.compile_fx import compile_fx
    loaded = _loaded_modules()
    with packing_scope(), shared_folding():
        compiled = compile_fx(gm, example_inputs)
    _unregister_new_modules(loaded)
    release_freed_memory()
    return compiled


def _loaded_modules() -> set[int]:
    from torch._inductor.codecache import PyCodeCache
    return {id(m) for m in PyCodeCache.modules}


def _unregister_new_modules(before: set[int]) -> None:
    """Inductor registers each graph's wrapper module, whose globals hold the frozen constants
    (every packed weight), in ``sys.modules`` and ``PyCodeCache.modules`` for good: a model
    whose compiled forward was dropped kept all of them (BERT-base: RSS 1237 MB compiled, 1231
    after dropping it and ``torch._dynamo.reset()``). Modules loaded with constants are never
    looked up again (Inductor caches only those without), so the ones this compile loaded are
    taken off both registries: the compiled graph's callable then holds its module alone, and
    the constants go with the graph."""
    import sys
    from torch._inductor.codecache import PyCodeCache
    shared = {id(m) for m in PyCodeCache.modules_no_attr.values()}
    new = [m for m in PyCodeCache.modules if id(m) not in before and id(m) not in shared]
    if not new:
        return
    gone = {id(m) for m in new}
    PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in gone]
    for m in new:
        if sys.modules.get(m.__name__) is m:
            del sys.modules[m.__name__]
