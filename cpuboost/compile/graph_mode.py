"""``optimize(..., graph_mode=True)``: the model's ``forward`` compiled by the cpuboost backend.

The compiled forward is installed as an instance attribute, so ``model(...)``, custom methods
calling ``self.forward(...)`` and the model's own hooks all go through it. Whenever Dynamo
compiles during one of its calls (the first call, a recompilation for a new input shape), the
backend's scope is in effect, so the trace is made with freezing; for bf16 every call runs under
CPU autocast, which freezing turns into bf16 weight constants.

The scope is entered from Dynamo's compile-start callback, not around every call: patching
Inductor's and Dynamo's configs per call cost 170 us (a tables-only DLRM-like int8 graph: 475 us
per call with it, 303 us without), more than all the compiled graph's kernels of a small model.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import threading
import time
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from cpuboost.compile.backend import cpuboost_backend, inductor_scope
from cpuboost.compile.dynamo_cache import BackendRef, drop_regions, region_of
from cpuboost.compile.graph_passes import OneDnnLinear
from cpuboost.compile.release import WeightRelease
from cpuboost.compile.state_watch import ModelState, dict_version
from cpuboost.errors import UnsupportedRequestError
from cpuboost.passes._context import ForwardStandIn


_GRAPHS = "graphs compiled so far:"
_GARBAGE = "garbage left by compiling, collected after each compile:"
_RELEASED = "inplace=True:"
_CONVS = "convolution weights of graphs with a dynamic batch (Inductor leaves them plain):"
SHAPE_POLICY = ("shape policy: the first input shape compiles a static graph; when a dim takes a "
                "second size, one graph with that dim dynamic is compiled and serves every later "
                "size (Dynamo's automatic dynamic shapes) - no padding, no compile per length "
                "(BERT-base, lengths 17/45/64/99/128: 2 graphs; 1 when another instance of the "
                "class already saw several sizes, as Dynamo learns dynamic dims per code object)")


# Dynamo counts recompilations per code object, so every compiled instance of one class (an
# fp32 and a bf16 GPT-2, say) shared the default limit of 8 graphs, and past it the later
# instance silently ran eager: GPT-2 bf16 generate measured 0.53x after an fp32 copy had
# compiled, 2.77x alone. Each instance gets its own cache and limit (isolate_recompiles).
_LIMIT = 64


@functools.cache
def _features() -> tuple[bool, bool]:
    """(torch.compile takes ``isolate_recompiles``, Dynamo has compile callbacks): torch 2.13
    has both. An older torch gets the patches around every call instead (correct, ~170 us
    slower per call)."""
    isolated = "isolate_recompiles" in inspect.signature(torch.compile).parameters
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return isolated, False
    return isolated, hasattr(callback_handler, "register_start_callback")


def _own_limit():
    """The per-call form of the per-instance limit, for a torch without isolate_recompiles."""
    import torch._dynamo.config as dynamo_config
    return dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, _LIMIT))


# Per thread: .owner, the CompiledForward whose call runs on this thread; .scope, the backend's
# scope while Dynamo compiles on this thread (streams may call one model from several threads).
_CALLING = threading.local()
_HOOKED = threading.Lock()


def _compile_started(args) -> None:
    owner = getattr(_CALLING, "owner", None)
    if owner is not None and getattr(_CALLING, "scope", None) is None:
        stack = contextlib.ExitStack()
        stack.enter_context(inductor_scope(owner.linear_pass))
        if owner.release is not None:  # tracing and freezing read the weights
            stack.enter_context(owner.release.compiling())
        _CALLING.scope = stack


def _compile_ended(args=None) -> None:
    stack = getattr(_CALLING, "scope", None)
    if stack is not None:
        _CALLING.scope = None
        stack.close()


def _hook_compiles() -> None:
    """Register the compile callbacks on a graph-mode call (not at import), and again after
    ``torch._dynamo.reset()`` cleared them; checked on every call (~1 us). They act only while
    a graph-mode forward runs on the compiling thread."""
    from torch._dynamo.callback import callback_handler
    if _compile_started in callback_handler.start_callbacks:
        return
    with _HOOKED:
        if _compile_started not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(_compile_started)
            callback_handler.register_end_callback(_compile_ended)




class CompiledForward(ForwardStandIn):
    """``model.forward`` compiled. ``name`` says which in the report ("forward", "encoder");
    ``outer`` is the model's own CompiledForward when this one compiles a submodule of it (the
    weight release is then the model's: one set of weights, restored and released together)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, record=None,
                 weight_dtype: torch.dtype = torch.float32, release_weights: bool = False,
                 name: str = "forward", outer: Optional["CompiledForward"] = None):
        self.model, self.dtype, self.record = model, dtype, record
        self.weight_dtype = weight_dtype  # of linears on cpuboost's AVX2 kernel (OneDnnLinear)
        self.name, self.outer = name, outer
        # inplace=True: weights held only packed by the graphs are released (compile/release.py);
        # it needs the compile-start callback to restore them before Dynamo compiles again
        self._release = None
        if release_weights and outer is None and _features()[1]:
            self._release = WeightRelease(
                model, lambda why: self._note(_RELEASED, f"weights kept: {why}"))
        self.calls = self.graphs = self.dynamic_graphs = 0
        self.graph_breaks = 0  # in the first call's compile
        self.changes = 0  # times the model's state changed after a compile
        self.failed = False  # the compiler raised: forward runs eager (see _fall_back)
        # set by optimize() without sample_input: the first call's compiled output is compared
        # with the model's own forward on a copy of its input, at this tolerance (_first_check)
        self.check_rtol: Optional[float] = None
        self._lock = threading.Lock()
        # Dynamo keeps the backend for good and this forward's graphs until told: a weak
        # backend, and the graphs dropped when this forward is (dynamo_cache.py)
        self._backend_ref, self._regions = BackendRef(self), []
        weakref.finalize(self, drop_regions, self._regions, self._backend_ref)
        self._setup()

    @property
    def release(self) -> Optional[WeightRelease]:
        # (read when called: a copy's outer may still be under construction when this one is)
        return self.outer.release if self.outer is not None else self._release

    def _setup(self):
        """A fresh Dynamo cache for this forward (its graphs compile on the next call)."""
        self.linear_pass = OneDnnLinear(self.weight_dtype)
        isolated, _ = _features()
        own = {"recompile_limit": _LIMIT, "isolate_recompiles": True} if isolated else {}
        self.watch = ModelState(self.model) if dict_version() and self.changes < 2 else None
        if self.watch is not None:
            own["options"] = {"guard_filter_fn": self.watch.filter}
        self.compiled = torch.compile(type(self.model).forward.__get__(self.model),
                                      backend=self._backend_ref, **own)
        region = region_of(self.compiled)
        if region is not None:
            self._regions.append(region)

    def _backend(self, gm, example_inputs):
        """cpuboost_backend, counting the graphs this forward compiled (a graph break or a
        recompilation for new shapes adds one) for the report."""
        self.graphs += 1
        if any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
                isinstance(d, torch.SymInt) for d in x.shape)) for x in example_inputs):
            self.dynamic_graphs += 1
        self._note(_GRAPHS, f"{self.graphs} ({self.dynamic_graphs} with dynamic shapes)")
        compiled = cpuboost_backend(gm, example_inputs)
        packed, plain = self.linear_pass.convs_packed, self.linear_pass.convs_plain
        if packed or plain:
            self._note(_CONVS, f"{packed} packed for oneDNN (one weight format for batches "
                               f"1-32), {plain} left plain (their format depends on the batch: "
                               "oneDNN reorders them on every call)")
        return compiled

    def _note(self, prefix: str, text: str, own: bool = True) -> None:
        """The report's note starting with ``prefix`` (this forward's own, unless ``own`` is
        False), replaced (or added) with the latest."""
        if self.record is None:
            return
        if own and self.name != "forward":
            prefix = f"{self.name}: {prefix}"
        notes, text = self.record.notes, f"{prefix} {text}"
        at = next((i for i, n in enumerate(notes) if n.startswith(prefix)), None)
        if at is None:
            notes.append(text)
        else:
            notes[at] = text

    def __call__(self, *args, **kwargs):
        if torch._C._get_tracing_state() is not None:
            raise UnsupportedRequestError(
                "torch.jit.trace cannot record a model compiled with graph_mode=True (TorchScript "
                "does not trace torch.compile'd code). It is compiled already: call it as it is, "
                "package it with cpuboost.export(), or trace a model optimized without "
                "graph_mode=True.")
        release = self.release
        if release is None:
            return self._call(*args, **kwargs)
        release.enter()  # released weights are Parameters again while the call runs
        try:
            return self._call(*args, **kwargs)
        finally:
            release.exit()

    def _call(self, *args, **kwargs):
        low = self.dtype != torch.float32
        if self.failed:
            with torch.autocast("cpu", dtype=self.dtype, enabled=low):
                return type(self.model).forward(self.model, *args, **kwargs)
        first = self.calls == 0
        counters = torch._dynamo.utils.counters
        breaks_before = dict(counters["graph_break"]) if first or self.release else None
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        t0, graphs = time.perf_counter(), self.graphs
        watch = self.watch
        if watch is not None and watch.changed():
            self._model_changed(watch)
        isolated, callbacks = _features()
        if callbacks:
            _hook_compiles()
        reference = self._reference(args, kwargs) if first and self.check_rtol else None
        outer, _CALLING.owner = getattr(_CALLING, "owner", None), self
        try:
            with self._older_torch_scope(isolated, callbacks), torch.autocast(
                    "cpu", dtype=self.dtype) if low else contextlib.nullcontext():
                out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            self._fall_back(e)
            return self(*args, **kwargs)
        finally:
            _CALLING.owner = outer
            _compile_ended()  # (already closed unless a compile raised before its end callback)
        self.calls += 1  # counted once it succeeded: a failed first call reports next time
        if reference is not None and not self._first_check(reference, out):
            out = reference  # (the release, stopped by the fall-back, keeps the weights)
        if self.release is not None and self.release.pending:
            self._release_weights(breaks_before != dict(counters["graph_break"]))
        if self.graphs != graphs:
            self._collect_garbage()
        if first and self.record is not None:
            self._report(time.perf_counter() - t0, breaks_before, hits_before, counters)
        return out

    def _reference(self, args, kwargs):
        """The model's own forward (in float32, as optimize's check) on a copy of the first
        call's input, or None where the input is not plain data (then it goes unchecked). A
        forward that changes the model's buffers (a step counter) gets them back as they were,
        so the compiled call, the user's, starts from there (the state went forward twice)."""
        from cpuboost.checks import buffer_state, buffers_kept, replay_copy, tensor_versions
        replay, why = replay_copy(self.model, args, kwargs, plain_only=True)
        if replay is not None and buffer_state(self.model) is None:
            replay, why = None, "its buffers are too large to copy and restore"
        if replay is None:
            if self.record is not None:
                self.record.notes.append(f"{self.name}: the first call was not checked against "
                                         f"the uncompiled model ({why}); pass sample_input= to "
                                         "optimize() to check it")
            return None
        # submodules' compiled forwards (an encoder-decoder's encoder, for generate()) step
        # aside too: the reference is the model as it was, and compiles nothing
        aside = {m: m.__dict__.pop("forward") for m in self.model.modules()
                 if m is not self.model and isinstance(m.__dict__.get("forward"), ForwardStandIn)}
        params = list(self.model.parameters())
        before = tensor_versions(params)
        try:
            with torch.no_grad(), buffers_kept(self.model):
                reference = type(self.model).forward(self.model, *replay[0], **replay[1])
        finally:
            for m, forward in aside.items():
                m.__dict__["forward"] = forward
        if tensor_versions(params) != before:  # (parameters are not copied: too large)
            if self.record is not None:
                self.record.notes.append(f"{self.name}: the first call was not checked against "
                                         "the uncompiled model (its forward changed the model's "
                                         "parameters, which ran twice)")
            return None
        return reference

    def _first_check(self, reference, out) -> bool:
        """Compare the first compiled output with the uncompiled one; on a mismatch the forward
        runs uncompiled from now on, reported as dropped (as optimize's check with sample_input
        drops a pass)."""
        from cpuboost.verify import compare
        check = compare(reference, out, self.check_rtol)
        if self.record is not None:
            self.record.notes.append(f"{self.name}: first call checked against the uncompiled "
                                     f"model: {check}")
        if check.passed:
            return True
        self._fall_back(RuntimeError(str(check)), "the compiled outputs failed the check")
        if self.record is not None:
            self.record.dropped = f"the first call's compiled outputs were off ({check})"
        return False

    def _release_weights(self, breaks: bool) -> None:
        """After a call that compiled: free the weights the graphs hold packed, unless a graph
        break (eager code between graphs might read them) or a compile on another thread."""
        release = self.release
        if breaks:
            release.stop("the forward has graph breaks (the code between its graphs runs "
                         "eagerly and may read them)")
            return
        release.release()
        if not release.stopped and not release.active:
            self._note(_RELEASED, f"{len(release.entries)} Linear weight(s) "
                                  f"({release.released_bytes() / 2**20:.1f} MB) released: the "
                                  "graphs' packed copies are the only ones (unpacked again for a "
                                  "recompilation and in state_dict())", own=False)

    def _collect_garbage(self) -> None:
        """A compile adds ~360k objects that Python tracks, ~40-130k of them garbage in
        reference cycles. The next full collection traverses all of them (0.4-0.6 s measured
        for ResNet-50 and BERT-base) and comes at a call the application makes later, once its
        own allocations trigger it: that call stalls as long. Collected here, the pause is part
        of compile time and the next full collection waits for 25% more long-lived objects."""
        t0 = time.perf_counter()
        found = gc.collect()
        self._note(_GARBAGE, f"{found} objects in {time.perf_counter() - t0:.2f}s the last time "
                             "(else the first full collection while serving would stall a call "
                             "as long)")

    def _model_changed(self, watch: ModelState) -> None:
        """An attribute the graphs were traced from was set since they were compiled: compile
        again from the model as it is now. A second change means the model changes between
        calls (its forward, or its caller, sets attributes): from then on Dynamo's own guards
        on the model are kept, which tell apart the states that matter and cache a graph for
        each."""
        with self._lock:
            if self.watch is not watch:
                return  # another thread got here first
            self.changes += 1
            self._setup()
        if self.record is not None:
            self.record.notes.append(
                "the model's attributes changed after forward was compiled: compiled again"
                + (" with Dynamo's guards on the model kept from now on (they cost ~0.5 ms per "
                   "call on a ResNet-50 or BERT-base)" if self.watch is None else ""))

    def _older_torch_scope(self, isolated: bool, callbacks: bool):
        """What the callbacks and the per-instance cache do, as patches around the call."""
        if isolated and callbacks:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if not callbacks:
            stack.enter_context(inductor_scope(self.linear_pass))
        if not isolated:
            stack.enter_context(_own_limit())
        return stack

    def _fall_back(self, error: Exception, what: str = "the compiler failed") -> None:
        """Inductor failed on this model (a compiler bug: e.g. its int8 add fusion asserts on
        ``conv(x) + conv(x)``), or its first output failed the check: run the model's own
        forward from now on, eager form restored (int8 layers packed again), and say so in the
        report and as a warning."""
        self.failed = True
        # its graphs go now, with the weights frozen into them (a copy each), not with the model
        drop_regions(self._regions, self._backend_ref)
        self._regions.clear()
        self.compiled = None
        if self.release is not None:
            self.release.stop(f"{what}: {self.name} runs eager")
        for m in self.model.modules():
            if m is not self.model and callable(getattr(m, "for_eager", None)):
                m.for_eager()
        inner = getattr(error, "inner_exception", None) or error
        why = f"{type(inner).__name__}: {str(inner).strip()[:200] or 'no message'}"
        if self.record is not None:
            self.record.skip(self.name, f"{what} ({why}); {self.name} runs eager")
        warnings.warn(f"cpuboost graph_mode: {what} on {type(self.model).__name__} ({why}); it "
                      "runs uncompiled (correct, not faster). See cpuboost.report_of(model).",
                      RuntimeWarning, stacklevel=3)

    def _report(self, seconds, breaks_before, hits_before, counters):
        cached = counters["inductor"]["fxgraph_cache_hit"] - hits_before
        breaks = {r: n - breaks_before.get(r, 0) for r, n in counters["graph_break"].items()
                  if n - breaks_before.get(r, 0) > 0}
        if cached:  # Inductor's cache skips the post-grad passes: their counts miss those graphs
            self.record.notes.append(
                f"{cached} graph(s) came from Inductor's cache: the activations and attentions "
                "moved into cpuboost's kernels are counted in freshly compiled graphs only")
        self.record.apply(f"{self.name} compiled with backend 'cpuboost' in {seconds:.1f}s "
                          f"(first call), {len(breaks)} graph break reason(s), "
                          f"{self.linear_pass.replaced} Linear(s) on oneDNN, "
                          f"{self.linear_pass.own} on cpuboost's AVX2 kernel "
                          f"({self.linear_pass.activations_fused} with the activation fused), "
                          f"{self.linear_pass.shared} on oneDNN with the plain weight they share "
                          "with an embedding (not packed: no second copy), "
                          f"{self.linear_pass.winograd} 3x3 convolution(s) on cpuboost's "
                          "Winograd kernel, "
                          f"{self.linear_pass.attention.replaced} attention(s) on cpuboost's "
                          f"bf16 kernel, {self.linear_pass.attention.replaced_f32} on its fp32 "
                          f"kernel, {self.linear_pass.embedding_bags} EmbeddingBag(s) on the "
                          "forward-only kernel")
        if self.linear_pass.attention.missed:
            from cpuboost.kernels import unavailable
            self.record.skip(self.name, f"{self.linear_pass.attention.missed} attention(s) kept on "
                                        f"torch's kernel: {unavailable()}")
        for reason, n in breaks.items():
            self.record.skip(self.name, f"graph break x{n}: {reason[:200]}")
        self.graph_breaks = sum(breaks.values())
        if breaks:
            self.record.notes.append(
                f"{self.name} has {self.graph_breaks} graph break(s): the code between its "
                "graphs runs as stock eager (graph mode turns the eager passes off), so it can "
                "be slower than graph_mode=False (Longformer-base: 0.85-0.96x of stock eager "
                "compiled). With sample_input, optimize times it against the model's own code "
                "and uses the eager passes instead unless it is 10% faster; without, time both")
        self.record.seconds += seconds

    # A copy or an unpickled model compiles afresh on its first call.
    def __getstate__(self):
        return {"model": self.model, "dtype": self.dtype, "record": self.record,
                "weight_dtype": self.weight_dtype, "release_weights": self._release is not None,
                "name": self.name, "outer": self.outer}

    def __setstate__(self, state):
        self.__init__(state["model"], state["dtype"], state["record"],
                      state.get("weight_dtype", torch.float32), state.get("release_weights", False),
                      state.get("name", "forward"), state.get("outer"))


class SubmoduleForward(ForwardStandIn):
    """A submodule's ``forward`` compiled of its own (an encoder-decoder's encoder, which
    ``generate()`` calls directly). Inside the model's own graph (its full forward traced by
    Dynamo) it is the submodule's code, inlined: Dynamo traces this object, which never changes
    after it is made (the watched dict versions stay), never the CompiledForward's counters."""

    def __init__(self, module: nn.Module, compiled: CompiledForward):
        self.model, self.compiled = module, compiled

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return type(self.model).forward(self.model, *args, **kwargs)
        return self.compiled(*args, **kwargs)


def encoder_path(model: nn.Module) -> Optional[str]:
    """Where the encoder is that an encoder-decoder model's ``generate()`` runs on its own
    (once per request, before the decoder steps that go through ``forward``); None for other
    models."""
    get = getattr(model, "get_encoder", None)
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or \
            not callable(get):
        return None
    try:
        encoder = get()
    except Exception:  # noqa: BLE001 - a model whose lookup fails is compiled without it
        return None
    if not isinstance(encoder, nn.Module) or encoder is model:
        return None
    return next((name for name, m in model.named_modules() if m is encoder and name), None)


def graph_mode(model: nn.Module, ctx) -> nn.Module:
    from cpuboost.checks import BF16_WEIGHTS_NOTE
    from cpuboost.passes._context import shell_path
    cfg = ctx.config
    path = encoder_path(model)
    # inplace=False: the model is a shell sharing the caller's modules, which stay as they were
    encoder = None if path is None else \
        model.get_submodule(path) if cfg.inplace else shell_path(model, path)
    model.__dict__["forward"] = CompiledForward(model, cfg.compute_dtype, ctx.record,
                                                cfg.weight_dtype, release_weights=cfg.inplace)
    if encoder is not None:
        encoder.__dict__["forward"] = SubmoduleForward(encoder, CompiledForward(
            encoder, cfg.compute_dtype, ctx.record, cfg.weight_dtype, name="encoder",
            outer=model.__dict__["forward"]))
        ctx.record.notes.append(f"encoder-decoder: the encoder ({path}), which generate() runs "
                                "once per request before the decoder steps, is compiled too, "
                                "on its first call (within a full forward it is part of the "
                                "model's graph)")
    if cfg.bf16_weights:
        ctx.record.notes.append(BF16_WEIGHTS_NOTE)
    ctx.record.notes.append("compiles on the first call of forward (with sample_input: now)")
    ctx.record.notes.append(SHAPE_POLICY)
    ctx.record.notes.append("the eager fold/pack/fuse passes are off in graph mode: Inductor's "
                            "freezing folds BatchNorm, packs weights and fuses in the graph")
    return model
