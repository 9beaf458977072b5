"""``optimize(..., graph_mode=True)``: the model's ``forward`` compiled by the cpuboost backend.

The compiled forward is installed as an instance attribute, so ``model(...)``, custom methods
calling ``self.forward(...)`` and the model's own hooks all go through it. Every call runs inside
the backend's scope, so a recompilation (a new input shape) is traced with freezing too; for
bf16 every call runs under CPU autocast, which freezing turns into bf16 weight constants.
"""
from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from cpuboost.compile.backend import cpuboost_backend, inductor_scope
from cpuboost.compile.graph_passes import OneDnnLinear


_GRAPHS = "graphs compiled so far:"
SHAPE_POLICY = ("shape policy: the first input shape compiles a static graph; when a dim takes a "
                "second size, one graph with that dim dynamic is compiled and serves every later "
                "size (Dynamo's automatic dynamic shapes) - no padding, no compile per length "
                "(BERT-base, lengths 17/45/64/99/128: 2 graphs)")


def _own_limit():
    """Dynamo counts recompilations per code object, so every compiled instance of one class
    (an fp32 and a bf16 GPT-2, say) shares the default limit of 8 graphs, and past it the
    later instance silently runs eager: GPT-2 bf16 generate measured 0.53x after an fp32 copy
    had compiled, 2.77x alone. Each instance has its own guards, so a higher limit is safe."""
    import torch._dynamo.config as dynamo_config
    return dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, _LIMIT))


_LIMIT = 64


class CompiledForward:
    def __init__(self, model: nn.Module, dtype: torch.dtype, record=None):
        self.model, self.dtype, self.record = model, dtype, record
        self._setup()

    def _setup(self):
        self.linear_pass = OneDnnLinear()
        self.compiled = torch.compile(type(self.model).forward.__get__(self.model),
                                      backend=self._backend)
        self.calls = self.graphs = self.dynamic_graphs = 0
        self.failed = False  # the compiler raised: forward runs eager (see _fall_back)

    def _backend(self, gm, example_inputs):
        """cpuboost_backend, counting the graphs this forward compiled (a graph break or a
        recompilation for new shapes adds one) for the report."""
        self.graphs += 1
        if any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
                isinstance(d, torch.SymInt) for d in x.shape)) for x in example_inputs):
            self.dynamic_graphs += 1
        if self.record is not None:
            text = f"{_GRAPHS} {self.graphs} ({self.dynamic_graphs} with dynamic shapes)"
            notes = self.record.notes
            at = next((i for i, n in enumerate(notes) if n.startswith(_GRAPHS)), None)
            if at is None:
                notes.append(text)
            else:
                notes[at] = text
        return cpuboost_backend(gm, example_inputs)

    def __call__(self, *args, **kwargs):
        low = self.dtype != torch.float32
        if self.failed:
            with torch.autocast("cpu", dtype=self.dtype, enabled=low):
                return type(self.model).forward(self.model, *args, **kwargs)
        first = self.calls == 0
        counters = torch._dynamo.utils.counters
        breaks_before = dict(counters["graph_break"]) if first else None
        t0 = time.perf_counter()
        try:
            with inductor_scope(self.linear_pass), _own_limit(), torch.autocast(
                    "cpu", dtype=self.dtype, enabled=low):
                out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            self._fall_back(e)
            return self(*args, **kwargs)
        self.calls += 1  # counted once it succeeded: a failed first call reports next time
        if first and self.record is not None:
            self._report(time.perf_counter() - t0, breaks_before, counters)
        return out

    def _fall_back(self, error: Exception) -> None:
        """Inductor failed on this model (a compiler bug: e.g. its int8 add fusion asserts on
        ``conv(x) + conv(x)``): run the model's own forward from now on, eager form restored
        (int8 layers packed again), and say so in the report and as a warning."""
        self.failed = True
        for m in self.model.modules():
            if m is not self.model and callable(getattr(m, "for_eager", None)):
                m.for_eager()
        inner = getattr(error, "inner_exception", None) or error
        why = f"{type(inner).__name__}: {str(inner).strip()[:200] or 'no message'}"
        if self.record is not None:
            self.record.skip("forward", f"the compiler failed ({why}); forward runs eager")
        warnings.warn(f"cpuboost graph_mode: the compiler failed on {type(self.model).__name__} "
                      f"({why}); it runs uncompiled (correct, not faster). See "
                      "cpuboost.report_of(model).", RuntimeWarning, stacklevel=3)

    def _report(self, seconds, breaks_before, counters):
        breaks = {r: n - breaks_before.get(r, 0) for r, n in counters["graph_break"].items()
                  if n - breaks_before.get(r, 0) > 0}
        self.record.apply(f"forward compiled with backend 'cpuboost' in {seconds:.1f}s "
                          f"(first call), {len(breaks)} graph break reason(s), "
                          f"{self.linear_pass.replaced} Linear(s) on oneDNN")
        for reason, n in breaks.items():
            self.record.skip("forward", f"graph break x{n}: {reason[:200]}")
        self.record.seconds += seconds

    # A copy or an unpickled model compiles afresh on its first call.
    def __getstate__(self):
        return {"model": self.model, "dtype": self.dtype, "record": self.record}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()


def graph_mode(model: nn.Module, ctx) -> nn.Module:
    model.__dict__["forward"] = CompiledForward(model, ctx.config.compute_dtype, ctx.record)
    ctx.record.notes.append("compiles on the first call of forward (with sample_input: now)")
    ctx.record.notes.append(SHAPE_POLICY)
    ctx.record.notes.append("the eager fold/pack/fuse passes are off in graph mode: Inductor's "
                            "freezing folds BatchNorm, packs weights and fuses in the graph")
    return model
