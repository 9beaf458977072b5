"""`cpuboost.quantize`: int8 in one call — fold BatchNorm, calibrate, swap Linear/Conv for int8
modules, fuse activations, measure each layer's error, and optionally compile."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from cpuboost import _env
from cpuboost.checks import check_model, run_sample
from cpuboost.config import OptimizeConfig
from cpuboost.errors import CalibrationError, ConfigError, UnsupportedRequestError
from cpuboost.hw import CpuFeatures, detect
from cpuboost.nn.anchor import float_parameter_kind, keep_a_parameter
from cpuboost.nn.int8 import _Int8, affine_qparams
from cpuboost.passes import (PassContext, fold_bn, fuse_pointwise, replace_module,
                             transformer_layers, weight_bytes)
from cpuboost.passes._dataflow import Dataflow, record
from cpuboost.quant.calibrate import CalibrationData, observe_inputs, observe_outputs
from cpuboost.quant.config import DynamicInt8Config, QuantConfig, StaticInt8Config
from cpuboost.quant.handoff import hand_off, share_inputs
from cpuboost.quant.layers import (WEIGHT_ONLY, bf16_module, float_parts, int8_module,
                                   kind_of, targets)
from cpuboost.quant.observers import Observer, make_observer
from cpuboost.quant.recipe import LayerRecipe, Recipe
from cpuboost.quant.shared_qdq import quantize_shared_outputs, residual_only_convs
from cpuboost.quant.smooth import ChannelStats, choose, judge_clip
from cpuboost.report import OptimizationReport, PassRecord, attach
from cpuboost.verify import cosine, sqnr_db

_HUGE = 1e6  # an activation range beyond +-this is reported
_FIRST = "example_inputs (or the first calibration item)"


def quantize(model: nn.Module, calib_data: Any = None, config: Optional[QuantConfig] = None, *,
             example_inputs: Any = None, inplace: bool = False, graph_mode: bool = False,
             recipe: Union[Recipe, str, Path, None] = None) -> nn.Module:
    """Return an int8 version of ``model`` (a copy unless ``inplace=True``).

    ``config``: ``StaticInt8Config()`` (default; needs ``calib_data``) or ``DynamicInt8Config()``.
    ``calib_data``: a list / DataLoader / generator of model inputs, or a function calling the
    model (then ``example_inputs`` is needed too). ``graph_mode=True`` compiles the result with
    the cpuboost backend. ``recipe`` (a Recipe or its JSON file, e.g. saved from
    ``recipe_of(result)`` or by autotune) fixes every layer's dtype and scales: no calibration.
    ``cpuboost.report_of(result)`` lists every int8 layer with its SQNR, what stayed in float
    and why.
    """
    recipe = Recipe.load(recipe) if isinstance(recipe, (str, Path)) else recipe
    cfg = _config_for(config, recipe)
    data = CalibrationData(calib_data, example_inputs)
    if recipe is None:
        _check_data(cfg, data)
    prepared = prepare_model(model, cfg, data.first_call(), inplace, recipe)
    if prepared.observers is not None or prepared.channels:
        t0 = time.perf_counter()
        data.run(prepared.work)
        prepared.calib_seconds = time.perf_counter() - t0
    return convert_model(prepared, graph_mode)


@dataclass
class Prepared:
    """A model between prepare and convert: observers attached to its layers' inputs."""
    work: nn.Module
    cfg: QuantConfig
    hw: CpuFeatures
    report: OptimizationReport
    first: Optional[tuple[tuple, dict]]
    reference: Any
    flow: Optional[Dataflow]
    targets: dict[str, nn.Module]
    rec: PassRecord
    given: Optional[Recipe] = None  # a recipe to apply instead of calibrating
    parameters: Optional[tuple] = None  # the original's float_parameter_kind (nn.anchor)
    observers: Optional[dict[str, Observer]] = None
    # convs whose output only residual adds read: their output range (see quant.shared_qdq)
    residual: dict[str, Observer] = field(default_factory=dict)
    channels: dict[str, ChannelStats] = field(default_factory=dict)  # SmoothQuant statistics
    handles: list = field(default_factory=list)
    calib_seconds: float = 0.0
    layers: dict[str, LayerRecipe] = field(default_factory=dict)  # the recipe being made


def prepare_model(model: nn.Module, cfg: QuantConfig, first, inplace: bool,
                  recipe: Optional[Recipe] = None) -> Prepared:
    """Copy (unless inplace), fold BatchNorm, pick the layers and observe their inputs."""
    check_model(model, "cpuboost.quantize")
    hw = detect()
    reference = run_sample(model, first, _FIRST) if first is not None else None
    work = model if inplace else copy.deepcopy(model)
    kind = "dynamic" if cfg.dynamic else "static"
    report = OptimizationReport(f"int8 {kind}", "O1", hw.summary(),
                                weight_bytes_before=weight_bytes(model))
    flow = record(work, lambda: work(*first[0], **first[1]))[0] if first is not None else None
    if flow is not None and not cfg.dynamic:
        _timed(report, "fold_bn",
               lambda r: fold_bn(work, PassContext(OptimizeConfig(), hw, r, flow)))
    _timed(report, "transformer_layers",
           lambda r: transformer_layers(work, PassContext(OptimizeConfig(), hw, r, flow)))
    rec = PassRecord("quantize")
    prepared = Prepared(work, cfg, hw, report, first, reference, flow, {}, rec, recipe,
                        float_parameter_kind(model))
    prepared.targets = targets(work, cfg, rec, prepared.layers)
    if not prepared.targets:
        _nothing_quantized(rec)
    if not cfg.dynamic and recipe is None:
        observed = {n: m for n, m in prepared.targets.items()
                    if kind_of(m) not in WEIGHT_ONLY}
        make = lambda name: make_observer(cfg.observer, name, cfg.percentile)  # noqa: E731
        residual = {} if flow is None else residual_only_convs(
            flow, {n: m for n, m in observed.items() if kind_of(m) == "conv"})
        prepared.observers, prepared.handles = observe_inputs(observed, make)
        prepared.residual, handles = observe_outputs(residual, make)
        prepared.handles += handles
    if (cfg.smooth_quant or _judges_clip(cfg)) and recipe is None:
        linears = {n: m for n, m in prepared.targets.items() if kind_of(m) == "linear"}
        prepared.channels, handles = observe_inputs(linears, lambda name: ChannelStats())
        prepared.handles += handles
    return prepared


def convert_model(prepared: Prepared, graph_mode: bool = False) -> nn.Module:
    """Swap the observed layers for int8 ones, measure them, fuse, optionally compile."""
    p, work = prepared, prepared.work
    for h in p.handles:
        h.remove()
    p.handles.clear()
    if p.observers is not None:
        calib = p.report.record("calibrate")
        calib.seconds = p.calib_seconds
        _calibration_notes(p.observers, p.cfg, calib)
    p.report.passes.append(p.rec)
    t0 = time.perf_counter()
    floats = _convert(p)
    if p.hw.int8_pairs_saturate:
        p.rec.notes.append("weights quantized pair-bounded: without VNNI, oneDNN adds two u8 x s8 "
                           "products in a saturating int16, so neighbouring int8 weights are "
                           "kept to a sum of 128 (activations keep all 8 bits)")
    sqnr = _layer_sqnr(work, floats, p.first) if p.first is not None else {}
    for name, (q, f) in floats.items():
        measured = f" (SQNR {sqnr[name]:.1f} dB)" if name in sqnr else (
            " (not run on the first input)" if p.first is not None else "")
        p.rec.apply(f"{name}: {type(f).__name__} -> int8{measured}")
        p.layers[name] = replace(p.layers[name], sqnr_db=sqnr.get(name))
    del floats
    p.report.recipe = Recipe(p.cfg, dict(p.layers))
    p.rec.seconds = time.perf_counter() - t0
    if p.cfg.fuse_activations and p.flow is not None:
        _timed(p.report, "fuse_activations",
               lambda r: fuse_pointwise(work, PassContext(OptimizeConfig(), p.hw, r, p.flow)))
    if p.flow is not None and not p.cfg.dynamic:
        _timed(p.report, "int8_hand_off", lambda r: hand_off(
            work, p.flow, r, lambda: run_sample(work, p.first, _FIRST)))
        _timed(p.report, "int8_shared_inputs", lambda r: share_inputs(work, p.flow, r))
    keep_a_parameter(work, p.parameters, p.rec)
    if graph_mode:
        _compile(work, p.hw, p.report, p.flow, p.cfg.dynamic)
    if p.first is not None:
        p.report.accuracy = _output_check(p.reference, run_sample(work, p.first, _FIRST))
    p.report.weight_bytes_after = weight_bytes(work)
    attach(work, p.report)
    if _env.verbose():
        print(p.report)
    return work


def _config_for(config, recipe: Optional[Recipe]) -> QuantConfig:
    if recipe is None:
        return resolve(config)
    if config is not None and config != recipe.config:
        raise ConfigError("pass config= or recipe=, not both: the recipe carries its config "
                          f"({recipe.config}).")
    return recipe.config


def resolve(config) -> QuantConfig:
    if config is None:
        return StaticInt8Config()
    if not isinstance(config, (StaticInt8Config, DynamicInt8Config)):
        raise ConfigError(f"config must be a StaticInt8Config or DynamicInt8Config, got "
                          f"{type(config).__name__}.")
    return config


def _check_data(cfg: QuantConfig, data: CalibrationData) -> None:
    if cfg.smooth_quant and not data.given:
        raise ConfigError("smooth_quant=True needs calib_data: SmoothQuant divides each input "
                          "channel by a factor computed from the ranges calibration sees.")
    if not cfg.dynamic and not data.given:
        raise ConfigError(
            "static int8 needs calibration data to fix activation ranges: pass calib_data= (a "
            "list of inputs, a DataLoader, or a function calling the model), or use "
            "config=DynamicInt8Config(), which needs none.")
    if data.func is not None and data.example is None:
        raise ConfigError("calib_data is a function, so pass example_inputs= too (one input "
                          "the model accepts): it shows which layers run and feeds the checks.")


# Activations use the whole uint8 range everywhere: on x86 without VNNI the weights are
# pair-bounded instead (nn.int8.quantize_weight). Int8 layers keep a qmax field so files saved
# with 0..127 activations still load.
_QMAX = 255


def _timed(report: OptimizationReport, name: str, run) -> None:
    rec = report.record(name)
    t0 = time.perf_counter()
    run(rec)
    rec.seconds = time.perf_counter() - t0


def _calibration_notes(observers: dict[str, Observer], cfg: StaticInt8Config,
                       rec: PassRecord) -> None:
    if not any(o.seen for o in observers.values()):
        raise CalibrationError(
            "calibration ran none of the layers to be quantized (the data was empty, or the "
            "model never called them); pass at least one batch the model runs on.")
    batches = max(o.batches for o in observers.values())
    rec.notes.append(f"{batches} batch(es) observed with the {cfg.observer} observer")
    for name, obs in observers.items():
        if obs.seen and max(-obs.lo, obs.hi) > _HUGE:
            lo, hi = obs.clip_range()
            rec.notes.append(f"{name}: huge input range [{obs.lo:.3g}, {obs.hi:.3g}]; quantized "
                             f"over [{lo:.3g}, {hi:.3g}] ({cfg.observer})")


def _act_qparams(p: Prepared, name: str):
    """(scale, zero point) for a layer's input, None for dynamic or weight-only, or a str: why
    it stays float."""
    weight_only = kind_of(p.targets[name]) in WEIGHT_ONLY
    if p.given is not None:
        r = p.given.layers.get(name)
        if r is None:
            return "not in the recipe"
        if r.dtype != "int8":
            return r.reason or f"{r.dtype} in the recipe"
        return None if p.cfg.dynamic or weight_only else (r.input_scale, r.input_zero_point)
    if p.observers is None or weight_only:
        return None
    obs = p.observers[name]
    if not obs.seen:
        return "did not run during calibration, so its input range is unknown"
    act = affine_qparams(*obs.clip_range(), _QMAX, p.cfg.activation_symmetric)
    stats = p.channels.get(name)
    if not _judges_clip(p.cfg) or stats is None or stats.sample is None:
        return act
    full = affine_qparams(obs.lo, obs.hi, _QMAX, p.cfg.activation_symmetric)
    if full == act:
        return act
    best, errs = judge_clip(stats, float_parts(p.targets[name])[0], [act, full], _QMAX,
                            p.cfg.weight_granularity == "per_channel")
    if best == 1:
        p.rec.notes.append(f"{name}: full observed input range kept (int8 output error on "
                           f"calibration rows x{errs[1] / max(errs[0], 1e-30):.2f} of the "
                           "histogram's clip)")
    return (act, full)[best]


def _judges_clip(cfg) -> bool:
    """Static histogram calibration: Linear inputs get the clip with the lower int8 output
    error, of the histogram's and the full observed range (smooth.judge_clip)."""
    return not cfg.dynamic and getattr(cfg, "observer", None) == "histogram"


def _residual_grid(p: Prepared, name: str) -> Optional[tuple[float, int]]:
    """uint8 (scale, zero point) for the output of a conv only residual adds read: from its
    calibrated output range, or from the recipe."""
    if p.given is not None:
        r = p.given.layers[name]
        return None if r.output_scale is None else (r.output_scale, r.output_zero_point)
    obs = p.residual.get(name)
    if obs is None or not obs.seen:
        return None
    return affine_qparams(*obs.clip_range(), 255, False)


def _smoothing(p: Prepared, name: str, m: nn.Module, act):
    """(act qparams, (smoothing vector or None, alpha or None)) for a layer: SmoothQuant's
    choice when it was asked for and beats no smoothing, or what the recipe says."""
    if p.given is not None:
        r = p.given.layers[name]
        if r.smoothing is None:
            return act, (None, None)
        return act, (torch.tensor(r.smoothing, dtype=torch.float32), r.smooth_alpha)
    stats = p.channels.get(name)
    if not p.cfg.smooth_quant or stats is None or stats.sample is None:
        return act, (None, None)
    weight, _ = float_parts(m)
    cfg = p.cfg
    sm = choose(stats, weight, _QMAX, getattr(cfg, "activation_symmetric", False),
                cfg.weight_granularity == "per_channel", cfg.smooth_alpha,
                unsmoothed=act)
    if sm.scale is None:
        return act, (None, None)
    p.rec.notes.append(f"{name}: smoothed (alpha {sm.alpha}), int8 error on its calibration "
                       f"sample x{sm.error_ratio:.2f} of unsmoothed")
    return (None if cfg.dynamic else sm.qparams), (sm.scale, sm.alpha)


def _convert(p: Prepared) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Swap each target for its int8 module. Returns name -> (int8, float module it replaced)."""
    done = {}
    for name, m in p.targets.items():
        act = _act_qparams(p, name)
        if isinstance(act, str):
            given = p.given.layers.get(name) if p.given is not None else None
            dtype = "bf16" if given is not None and given.dtype == "bf16" else "fp32"
            if dtype == "bf16":
                _swap(p, m, bf16_module(m))
            p.rec.skip(name, f"kept in {dtype}: {act}")
            p.layers[name] = LayerRecipe(kind_of(m), dtype, reason=act)
            continue
        act, smoothing = _smoothing(p, name, m, act)
        shape = p.flow.first_shape(m) if p.flow is not None else None
        q = int8_module(m, act, p.cfg, _QMAX, shape, smooth=smoothing[0])
        _swap(p, m, q)
        grid = _residual_grid(p, name)
        if grid is not None:
            q.residual_grid = grid
        seen = p.observers.get(name) if p.observers is not None else None
        p.layers[name] = LayerRecipe(
            kind_of(m), "int8", getattr(q, "x_scale", None), getattr(q, "x_zp", None),
            (seen.lo, seen.hi) if seen is not None else (
                p.given.layers[name].observed_range if p.given is not None else None),
            smooth_alpha=smoothing[1],
            smoothing=None if smoothing[0] is None else tuple(smoothing[0].tolist()),
            output_scale=None if grid is None else grid[0],
            output_zero_point=None if grid is None else grid[1])
        done[name] = (q, m)
    if not done:
        _nothing_quantized(p.rec)
    return done


def _swap(p: Prepared, old: nn.Module, new: nn.Module) -> None:
    replace_module(p.work, old, new)
    if p.flow is not None:
        p.flow.rebind(old, new)
    bn = old.__dict__.get("_folded_bn")
    if bn is not None:  # the folded BatchNorm now belongs to the new module
        object.__setattr__(bn, "_producer", new)


def _nothing_quantized(rec: PassRecord):
    reasons = "; ".join(f"{w}: {why}" for w, why in rec.skipped[:3]) or "none found"
    raise UnsupportedRequestError(
        f"quantize found no layer it could make int8 ({reasons}). Nothing was quantized; the "
        "model passed in was not changed (with inplace=True its BatchNorms may be folded).")


def _layer_sqnr(model, converted, first) -> dict[str, float]:
    """Each int8 layer's own error: its output vs the float layer's on the same input."""
    results: dict[str, float] = {}
    handles = []
    for name, (q, f) in converted.items():
        def hook(mod, args, kwargs, out, name=name, f=f):
            if name not in results:
                results[name] = sqnr_db(f(*args, **kwargs), out)
        handles.append(q.register_forward_hook(hook, with_kwargs=True))
    try:
        run_sample(model, first, _FIRST)
    finally:
        for h in handles:
            h.remove()
    return results


def _compile(model: nn.Module, hw: CpuFeatures, report: OptimizationReport,
             flow: Optional[Dataflow], dynamic: bool) -> None:
    from cpuboost.compile.graph_mode import graph_mode
    if not dynamic:
        _timed(report, "quantize_shared_outputs",
               lambda r: quantize_shared_outputs(model, flow, r))
    kept = 0
    for m in model.modules():
        if isinstance(m, _Int8) and m.traced_as_op:
            kept += 1
        elif isinstance(m, _Int8):
            m.for_compile()
    if kept:
        report.record("int8_linears_on_cpuboost_kernel").apply(
            f"{kept} int8 linears stay on cpuboost's AVX2 int8 kernel inside the compiled graph "
            "(faster than the oneDNN int8 kernel Inductor would use on a CPU without VNNI)")
    _timed(report, "graph_mode", lambda rec: graph_mode(
        model, PassContext(OptimizeConfig(graph_mode=True), hw, rec)))


def _output_check(reference, output) -> str:
    s, c = sqnr_db(reference, output), cosine(reference, output)
    return f"output vs the original model on the first input: SQNR {s:.1f} dB, cosine {c:.5f}"


__all__ = ["Prepared", "convert_model", "prepare_model", "quantize", "resolve"]
