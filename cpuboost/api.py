"""`cpuboost.optimize`: validate, copy unless inplace, run the plan of passes, verify, report."""
from __future__ import annotations

import copy
import inspect
import sys
import sysconfig
import threading
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from cpuboost import _env
from cpuboost._memory import available_bytes, release_freed_memory
from cpuboost.checks import (as_call, bf16_weights_only, buffer_state, buffers_kept,
                             call_target, changed_buffers, check_dtype, check_model,
                             check_requests, emulated_bf16, ipex_only_arguments, put_buffers,
                             replay_copy, run_sample, tensor_versions)
from cpuboost.config import OptimizeConfig
from cpuboost.errors import ConfigError
from cpuboost.hw import CpuFeatures, detect
from cpuboost.nn.anchor import float_parameter_kind, keep_a_parameter
from cpuboost.nn.tracing import untraced
from cpuboost.passes import (PassContext, autocast_scope, embedding_tables, fold_bn, fuse_add,
                             fuse_pointwise, prepack,
                             remove_dropout, transformer_layers, weight_bytes)
from cpuboost.passes._context import ForwardStandIn, shell
from cpuboost.passes._dataflow import Dataflow, Recording, record
from cpuboost.report import NumericsCheck, OptimizationReport, attach, report_of
from cpuboost.verify import compare


class Step(NamedTuple):
    name: str
    run: Callable[[nn.Module, PassContext], nn.Module]
    wanted: Callable[[OptimizeConfig], bool]
    needs_flow: bool  # must see the model execute (runs at optimize time with sample_input,
    #                   else at the first call)


def _graph_mode(model: nn.Module, ctx: PassContext) -> nn.Module:
    from cpuboost.compile.graph_mode import graph_mode  # torch._inductor only when asked for
    return graph_mode(model, ctx)


def _eager(c: OptimizeConfig) -> bool:
    # Compiled graphs get folding, packing and fusion from Inductor's freezing instead: it
    # cannot lower a weight our eager passes packed (measured: LoweringException).
    return not c.graph_mode


PLAN = (
    Step("remove_dropout", remove_dropout, lambda c: _eager(c) and c.replace_dropout_with_identity,
         False),
    Step("fold_bn", fold_bn,
         lambda c: _eager(c) and (c.conv_bn_folding or c.linear_bn_folding), True),
    Step("transformer_layers", transformer_layers,
         lambda c: _eager(c) and (c.weights_prepack or c.low_precision), True),
    Step("prepack", prepack, lambda c: _eager(c) and (c.weights_prepack or c.low_precision), True),
    Step("fuse_add", fuse_add,
         lambda c: _eager(c) and c.fuse_pointwise and c.weights_prepack, True),
    Step("fuse_pointwise", fuse_pointwise,
         lambda c: _eager(c) and c.fuse_pointwise and c.weights_prepack, True),
    Step("embedding_tables", embedding_tables,
         lambda c: _eager(c) and (c.weights_prepack or c.low_precision), True),
    Step("autocast_scope", autocast_scope, lambda c: _eager(c) and c.low_precision, True),
    # needs_flow=False: it runs now; the first call (the sample's, if given) compiles
    Step("graph_mode", _graph_mode, lambda c: c.graph_mode, False),
)


def optimize(model: nn.Module, dtype: Optional[torch.dtype] = None, optimizer=None,
             level: str = "O1", inplace: bool = False, conv_bn_folding: Optional[bool] = None,
             linear_bn_folding: Optional[bool] = None, weights_prepack: Optional[bool] = None,
             replace_dropout_with_identity: Optional[bool] = None,
             optimize_lstm: Optional[bool] = None,
             split_master_weight_for_bf16: Optional[bool] = None,
             fuse_update_step: Optional[bool] = None,
             auto_kernel_selection: Optional[bool] = None, sample_input=None,
             graph_mode: Optional[bool] = None, concat_linear: Optional[bool] = None, *,
             config: Optional[OptimizeConfig] = None) -> nn.Module:
    """Return a faster inference version of ``model`` (a copy unless ``inplace=True``).

    Arguments are ``ipex.optimize``'s, in its order (docs/optimize.md, "Switching from IPEX"):
    switching is a changed import. With ``sample_input`` the model is optimized now and its
    outputs are checked against the original's; without it, passes that must see the model
    run wait for its first call. ``cpuboost.report_of(result)`` says what was done, skipped
    and why.
    """
    flags = dict(conv_bn_folding=conv_bn_folding, linear_bn_folding=linear_bn_folding,
                 weights_prepack=weights_prepack,
                 replace_dropout_with_identity=replace_dropout_with_identity)
    ipex_notes = ipex_only_arguments(optimizer, optimize_lstm, split_master_weight_for_bf16,
                                     fuse_update_step, concat_linear)
    check_model(model)
    own = _own_low_precision(model)
    if own == torch.bfloat16 and dtype is None and config is None:
        dtype = own  # a model loaded in bf16 stays bf16 (its weights are not widened to fp32)
    cfg = _resolve_config(config, dtype, level, inplace, flags, graph_mode)
    if auto_kernel_selection is not None:  # IPEX: time oneDNN against the alternative
        if config is not None:
            raise ConfigError("pass either config= or auto_kernel_selection=, not both: "
                              "OptimizeConfig(..., measure_kernels=True) is the same option.")
        cfg = cfg.with_(measure_kernels=bool(auto_kernel_selection))
    hw = detect()
    check_dtype(cfg, hw)
    check_requests(cfg, hw)
    if cfg.weights_prepack and bf16_weights_only(cfg.dtype, hw):
        cfg = cfg.with_(bf16_weights=True)
    widened = own if own is not None and cfg.rtol < cfg.rtol_low_precision else None
    if widened is not None:  # an fp16 model with dtype=None: computed in fp32, returned in fp16
        cfg = cfg.with_(rtol_fp32=cfg.rtol_low_precision)
    call = as_call(sample_input) if sample_input is not None else None
    reference = run_sample(model, call) if call is not None else None
    source = model
    if cfg.inplace and call is not None and cfg.verify and not cfg.graph_mode:
        source = copy.deepcopy(model)  # to redo the plan without a pass that breaks numerics
    work = model if cfg.inplace else shell(model) if cfg.graph_mode else copy.deepcopy(model)
    report = OptimizationReport(cfg.dtype_name, cfg.level, hw.summary(),
                                weight_bytes_before=weight_bytes(model))
    slow = emulated_bf16(cfg.compute_dtype, hw)
    if slow:
        report.warnings.append(slow)
    if ipex_notes:
        rec = report.record("ipex_arguments")
        for name, why in ipex_notes:
            rec.skip(name, why)
    if widened is not None:
        report.warnings.append(
            f"the model's parameters are {str(widened).replace('torch.', '')}: its own outputs "
            f"carry that rounding, so the optimized model is checked against them at the "
            f"low-precision tolerance ({cfg.rtol_low_precision:g}) instead of float32's")
    steps = [s for s in PLAN if s.wanted(cfg)]
    # attached before any step: graph mode's check of the model's state after compiling (see
    # compile/state_watch.py) would see a later attribute as a change and compile again
    attach(work, report)
    if call is None:
        _run(work, [s for s in steps if not s.needs_flow], cfg, hw, report, None)
        _defer(work, [s for s in steps if s.needs_flow], cfg, hw, report)
        compiled = work.__dict__.get("forward")
        if cfg.verify and hasattr(compiled, "check_rtol"):  # graph mode: checked when it compiles
            compiled.check_rtol = cfg.rtol
    else:
        work = _apply_verified(work, source, steps, cfg, hw, report, call, reference)
        slower = _compiled_slower(work, cfg, report, call)
        if slower:
            from cpuboost.compile.choice import drop_compiled
            drop_compiled(work)
            del work  # (not inplace: the shell goes too, before the eager passes' copy is made)
            return _eager_instead(model, cfg, sample_input, report, slower)
    report.weight_bytes_after = weight_bytes(work)
    attach(work, report)
    # the weights packing replaced are freed, but glibc keeps their pages in the process
    # (Longformer-base, eager passes: RSS after optimize 1.95x eager's, 1.49x with them returned)
    release_freed_memory()
    if _env.verbose():
        print(report)
    return work


def _compiled_slower(work, cfg, report, call) -> Optional[str]:
    if not cfg.graph_mode or (report.numerics is not None and not report.numerics.passed):
        return None
    from cpuboost.compile.choice import slower_than_eager
    return slower_than_eager(work, call)


def _eager_instead(model, cfg, sample_input, report, why: str) -> nn.Module:
    """optimize() with the eager passes, its report ending with graph mode, dropped and why."""
    result = optimize(model, config=cfg.with_(graph_mode=False), sample_input=sample_input)
    final = report_of(result)
    tried = report.pass_named("graph_mode")
    tried.dropped = f"{why}; the eager passes are used instead"
    final.passes.append(tried)
    final.warnings.append(f"graph_mode=True was not used: {tried.dropped}")
    return result


def _own_low_precision(model: nn.Module) -> Optional[torch.dtype]:
    """bf16 or fp16 where most of the model's floating-point parameters are (a model loaded
    with torch_dtype=torch.bfloat16): its own rounding exceeds float32's tolerance, and the
    check dropped every pass that reorders a sum (BatchNorm folding: 1e-3 in bf16)."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    top = max(sizes, key=sizes.get, default=None)
    return top if top in (torch.bfloat16, torch.float16) else None


def _resolve_config(config, dtype, level, inplace, flags, graph_mode) -> OptimizeConfig:
    if config is None:
        return OptimizeConfig.from_ipex(dtype=dtype, level=level, inplace=inplace,
                                        graph_mode=graph_mode, **flags)
    if not isinstance(config, OptimizeConfig):
        raise ConfigError(f"config must be a cpuboost.OptimizeConfig, got {type(config).__name__}.")
    given = [k for k, v in dict(flags, graph_mode=graph_mode).items() if v is not None] + (
        ["dtype"] if dtype is not None else [])
    if given or level != "O1":
        raise ConfigError(f"pass either config= or keyword options, not both (also got {given or ['level']}); "
                          "put them in the config: OptimizeConfig(..., dtype=...).")
    return config.with_(inplace=True) if inplace else config


def _run(model, steps, cfg, hw, report, flow: Optional[Dataflow]) -> nn.Module:
    before = float_parameter_kind(model)
    for step in steps:
        rec = report.record(step.name)
        t0 = time.perf_counter()
        model = step.run(model, PassContext(cfg, hw, rec, flow))
        rec.seconds = time.perf_counter() - t0
    if steps:
        keep_a_parameter(model, before, rec)
    return model


def _apply(model, steps, cfg, hw, report, call) -> nn.Module:
    """Run ``steps``: those that need no dataflow first, then record one call and run the rest."""
    model = _run(model, [s for s in steps if not s.needs_flow], cfg, hw, report, None)
    traced = [s for s in steps if s.needs_flow]
    if traced:
        args, kwargs = call
        target = call_target(model, call)
        with buffers_kept(model):  # (a check's runs all start from the same state)
            flow, _ = record(model, lambda: target(*args, **kwargs))
        model = _run(model, traced, cfg, hw, report, flow)
    return model


def _checked(reference, steps, model, cfg, hw, report, call, rtol) -> tuple[nn.Module, NumericsCheck]:
    """Apply ``steps`` and compare with the reference. A pass that makes the model raise (on an
    input the original accepted) is a failed check like a wrong output, not the user's error."""
    try:
        model = _apply(model, steps, cfg, hw, report, call)
        return model, compare(reference, run_sample(model, call), rtol)
    except Exception as e:
        report.warnings.append(f"optimized model raised {type(e).__name__}: {str(e)[:200]}")
        return model, NumericsCheck(float("inf"), float("inf"), rtol, False, 0)


def _apply_verified(work, source, steps, cfg, hw, report, call, reference) -> nn.Module:
    rtol = cfg.rtol
    if not cfg.verify:
        return _apply(work, steps, cfg, hw, report, call)
    work, report.numerics = _checked(reference, steps, work, cfg, hw, report, call, rtol)
    if report.numerics.passed:
        return work
    return _redo_checked(work, source, steps, cfg, hw, report, call, reference, cfg.inplace)


def _redo_checked(work, source, steps, cfg, hw, report, call, reference, into_work: bool,
                  earlier: tuple = ()) -> nn.Module:
    """Something broke numerics: redo from ``source`` (the model before ``steps``), adding
    passes one at a time and keeping only those that still check out. Rare, so the extra copies
    and forwards are acceptable. ``into_work``: the caller holds ``work``, which becomes the
    verified model. ``earlier``: records of passes run before ``steps``, kept in the report."""
    rtol = cfg.rtol
    failed, kept, dropped = report.numerics, [], {}
    for step in steps:
        scratch = OptimizationReport(report.dtype, report.level, report.hardware)
        _, check = _checked(reference, kept + [step], copy.deepcopy(source), cfg, hw, scratch,
                            call, rtol)
        if check.passed:
            kept.append(step)
        else:
            dropped[step.name] = report.pass_named(step.name)
            dropped[step.name].dropped = f"outputs off the original beyond rtol {rtol:g}"
    final_report = OptimizationReport(report.dtype, report.level, report.hardware)
    final = _apply(copy.deepcopy(source), kept, cfg, hw, final_report, call)
    # The report describes the model returned: the kept passes as applied to it, then the
    # dropped ones with what they would have done.
    report.passes = list(earlier) + final_report.passes + list(dropped.values())
    report.numerics = compare(reference, run_sample(final, call), rtol)
    report.warnings.append(f"the full plan failed the numerics check ({failed}); "
                           "dropped passes are marked DROPPED")
    if into_work:  # the caller holds `work`: make that object the verified model
        work.__dict__.clear()
        work.__dict__.update(final.__dict__)
        return work
    return final


class _FirstCall(ForwardStandIn):
    """Without sample_input, the passes that must see the model run do so on its first call
    of ``forward`` — through ``model(...)`` or a custom method calling ``self.forward(...)`` —
    or of a custom method that never calls ``forward`` (an ``_EntryStandIn`` each; IPEX
    skipped conv+bn folding for those). It stands in as the instance's ``forward`` and removes
    itself (and the method stand-ins) once the passes ran; the recorded call itself runs the
    unmodified modules, so its result is the original's. The optimized model then runs the
    same call once more and is checked against that result, as with sample_input (passes that
    break it are dropped), where the input can be replayed. Calls from other threads meanwhile
    (a server's pool, MultiStreamModule's streams) wait for it and then run the optimized
    model: run alongside, they saw modules change under them."""

    def __init__(self, model, steps, cfg, hw, report):
        self.model, self.steps, self.cfg, self.hw, self.report = model, steps, cfg, hw, report
        self.busy = False
        # during a custom method's first call: None until forward is reached, then (forward's
        # replay copy, its output); () when not armed
        self.nested: Optional[tuple] = ()
        self.lock = threading.RLock()  # re-entrant: the passes call the model on this thread

    def __getstate__(self):  # a copy or pickle of the model made before its first call:
        state = {k: v for k, v in self.__dict__.items() if k != "lock"}  # no lock to copy,
        state["steps"] = [step.name for step in self.steps]  # and PLAN's steps by name
        return state  # (their conditions are lambdas: pickling failed)

    def __setstate__(self, state):
        steps = {step.name: step for step in PLAN}
        state = dict(state, steps=[steps[name] for name in state["steps"]])
        state.setdefault("nested", ())
        self.__dict__.update(state, lock=threading.RLock())

    def __call__(self, *args, **kwargs):
        return self.enter("forward", args, kwargs)

    def enter(self, entry: str, args, kwargs):
        with self.lock:
            if self.model.__dict__.get("forward") is not self:  # another thread's first call
                return getattr(self.model, entry)(*args, **kwargs)  # ran the passes meanwhile
            return self._first(entry, args, kwargs)

    def _first(self, entry: str, args, kwargs):
        model = self.model
        original = getattr(type(model), entry).__get__(model)
        if self.busy:  # forward calling itself, or the passes running the model: just run it
            if entry == "forward" and self.nested is None:  # a custom method's first call
                return self._nested_forward(original, args, kwargs)  # reached forward
            return original(*args, **kwargs)
        if torch._C._get_tracing_state() is not None:  # torch.jit.trace before any call:
            with untraced():  # the passes run (and are checked) outside the trace,
                self.enter(entry, args, kwargs)
            return getattr(model, entry)(*args, **kwargs)  # and the trace records the result
        self.busy = True  # until the passes are done: their runs of the model come back here
        ran = done = False
        try:
            replay, why = replay_copy(model, args, kwargs) if self.cfg.verify else (None, "")
            versions = tensor_versions(model.parameters()), tensor_versions(model.buffers())
            buffers = buffer_state(model) if replay is not None else None
            before = None if buffers is None else \
                {name: b.clone() for name, (b, _) in buffers.items()}
            rec = Recording(model)
            rec.start()
            output = None
            # armed for the forward a method may call (not where no replay is possible: hooks)
            self.nested = None if entry != "forward" and replay is not None else ()
            try:
                output = original(*args, **kwargs)
                ran = True
            finally:
                flow = rec.stop(output)
            if entry != "forward" and not flow.calls:  # a method that runs no part of the
                return output  # model (a getter, a reset): the passes wait for another call
            reference = output
            if self.nested:  # the method called forward: the check replays and compares that
                (replay, why), reference = self.nested  # call (float outputs, where the
                entry = "forward"  # method's, e.g. an argmax, would flip on a near-tie)
            after, replay, why = _rewound(model, replay, why, versions, buffers, before)
            if replay is not None:
                replay = _FreshCall(replay)
                replay.entry = entry
            why = _run_checked(model, self.steps, self.cfg, self.hw, self.report, flow, replay,
                               reference) or why
            put_buffers(model, after)  # where the user's call left them
            done = True
        finally:
            self.busy, self.nested = False, ()
            if done or (ran and entry == "forward"):  # (a first call that raised: try again)
                _remove_stand_ins(model)
        if self.cfg.verify and why:
            self.report.warnings.append(f"the passes run at the first call were not checked "
                                        f"against the original ({why}); pass sample_input= "
                                        "to optimize() to check them")
        self.report.pending = None
        self.report.weight_bytes_after = weight_bytes(model)
        attach(model, self.report)
        return output

    def _nested_forward(self, original, args, kwargs):
        """forward, first reached inside a custom method's first call: run it, keeping a copy
        of its arguments and its output, which the check then replays and compares."""
        replay = replay_copy(self.model, args, kwargs, hooks_checked=True) \
            if self.cfg.verify else (None, "")  # (the hooks now are the recording's)
        self.nested = ()  # (once: forward calling itself runs plainly)
        output = original(*args, **kwargs)
        self.nested = (replay, output)
        return output


def _rewound(model, replay, why, versions, buffers, before):
    """After the first call ran the original forward (or custom method): where it changed
    buffers (a step counter), they go back to their values before it, so that the passes'
    check replays the call from the same state; returns (the values to put back once checked,
    replay, why)."""
    if replay is None:
        return {}, replay, why
    if tensor_versions(model.parameters()) != versions[0]:  # (too large to copy)
        return {}, None, "its forward changed the model's parameters"
    if buffers is None:
        if tensor_versions(model.buffers()) != versions[1]:
            return {}, None, ("its forward changed the model's buffers, which are too large to "
                              "copy and put back")
        return {}, replay, why
    changed = changed_buffers(model, buffers)
    named = dict(model.named_buffers())
    after = {name: named[name].clone() for name in changed}
    put_buffers(model, {name: before[name] for name in changed})
    return after, replay, why


class _EntryStandIn:
    """Stands in for a custom method of the model (an inference entry point that may never
    call ``forward``) until the first call's passes ran; its first call is that first call."""

    def __init__(self, first: _FirstCall, name: str):
        self.first, self.name = first, name

    def __call__(self, *args, **kwargs):
        return self.first.enter(self.name, args, kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        model = self.first.model
        return inspect.signature(getattr(type(model), self.name).__get__(model))


def _entry_points(model: nn.Module) -> tuple[str, ...]:
    """Public methods the model's own classes define, other than forward: custom entry points
    that may never call it. Not those of library classes (torch's, transformers', Lightning's:
    anything installed), whose many methods are not the user's inference path."""
    names: list[str] = []
    for cls in type(model).__mro__:
        if _from_a_library(cls):
            continue
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and not name.startswith("_") and name != "forward" \
                    and name not in names and name not in model.__dict__:
                names.append(name)
    return tuple(names)


def _from_a_library(cls: type) -> bool:
    if cls.__module__ == "__main__":  # a script's or a notebook's own class (no __file__)
        return False
    where = str(getattr(sys.modules.get(cls.__module__), "__file__", None) or "")
    return cls.__module__.split(".")[0] in ("cpuboost", "builtins") or not where or \
        any(part in where for part in ("site-packages", "dist-packages", sysconfig.get_paths()
                                       ["stdlib"]))


def _stand_ins(model: nn.Module) -> list[str]:
    return [name for name, v in model.__dict__.items() if isinstance(v, (_FirstCall,
                                                                        _EntryStandIn))]


def _remove_stand_ins(model: nn.Module) -> None:
    for name in _stand_ins(model):
        del model.__dict__[name]


def _copy_without_stand_in(model: nn.Module) -> nn.Module:
    """A copy of ``model`` during its first call, without the stand-ins still in place."""
    held = {name: model.__dict__.pop(name) for name in _stand_ins(model)}
    try:
        return copy.deepcopy(model)
    finally:
        model.__dict__.update(held)


class _FreshCall(tuple):
    """A replayed call's (args, kwargs) that unpacks to a new copy each time: every run of the
    check, and of its redo pass by pass, starts from the arguments as the first call got them
    (a key/value cache the previous run filled would change the outputs). ``entry``: the
    method the first call came through (checks.call_target)."""

    entry = "forward"

    def __iter__(self):
        return iter(copy.deepcopy((self[0], self[1])))


def _run_checked(model, steps, cfg, hw, report, flow, replay, reference) -> Optional[str]:
    """The deferred passes on ``model`` (in place), then, with ``replay`` (the first call's
    arguments), its output on them against ``reference`` (the original's): redone pass by pass
    from a copy taken before them if that fails. Returns why nothing was checked, if so."""
    source, why = None, None
    size, free = weight_bytes(model), available_bytes()
    if replay is not None and free is not None and 2 * size > free:  # (inplace=True to save it)
        replay, why = None, (f"a copy of the model ({size / 2**30:.1f} GB) to redo its passes "
                             f"from would not fit comfortably in memory ({free / 2**30:.1f} GB "
                             "available)")
    try:
        source = _copy_without_stand_in(model) if replay is not None else None
    except Exception as e:  # a model that cannot be copied keeps the unchecked passes
        why = f"the model could not be copied ({type(e).__name__})"
    earlier = tuple(report.passes)
    _run(model, steps, cfg, hw, report, flow)
    if source is None:
        return why
    try:
        report.numerics = compare(reference, run_sample(model, replay), cfg.rtol)
    except Exception as e:
        report.warnings.append(f"optimized model raised {type(e).__name__}: {str(e)[:200]}")
        report.numerics = NumericsCheck(float("inf"), float("inf"), cfg.rtol, False, 0)
    if not report.numerics.passed:
        _redo_checked(model, source, steps, cfg, hw, report, replay, reference, True, earlier)
    return None


def _defer(work, steps, cfg, hw: CpuFeatures, report) -> None:
    if not steps:
        return
    entries = _entry_points(work)
    via = "forward" + "".join(f" or {name}()" for name in entries)
    report.pending = (f"{', '.join(s.name for s in steps)} run at the first call of {via}, "
                      "then checked against the original's output on that call (pass "
                      "sample_input= to optimize and check now)")
    # An instance attribute shadows the class's forward, for __call__ and self.forward alike.
    first = _FirstCall(work, steps, cfg, hw, report)
    work.__dict__["forward"] = first
    for name in entries:
        work.__dict__[name] = _EntryStandIn(first, name)
