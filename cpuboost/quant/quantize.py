"""`cpuboost.quantize`: int8 in one call — fold BatchNorm, calibrate, swap Linear/Conv for int8
modules, fuse activations, measure each layer's error, and optionally compile."""
from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from cpuboost import _env
from cpuboost.checks import check_model, run_sample
from cpuboost.config import OptimizeConfig
from cpuboost.errors import CalibrationError, ConfigError, UnsupportedRequestError
from cpuboost.hw import CpuFeatures, detect
from cpuboost.nn.fused import (FusedConv, FusedConv1DLinear, FusedConvTranspose, FusedLinear,
                               _Fused, is_hf_conv1d)
from cpuboost.nn.int8 import Int8Conv, Int8Linear, _Int8
from cpuboost.passes import (PassContext, fold_bn, fuse_pointwise, replace_module,
                             transformer_layers, weight_bytes)
from cpuboost.passes._dataflow import Dataflow, record
from cpuboost.passes.prepack import _conv_padding, module_parents, why_not_packable
from cpuboost.quant.calibrate import CalibrationData, observe_inputs
from cpuboost.quant.config import DynamicInt8Config, QuantConfig, StaticInt8Config
from cpuboost.quant.observers import Observer, affine_qparams, make_observer
from cpuboost.report import OptimizationReport, PassRecord, attach
from cpuboost.verify import cosine, sqnr_db

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_HUGE = 1e6  # an activation range beyond +-this is reported
_FIRST = "example_inputs (or the first calibration item)"


def quantize(model: nn.Module, calib_data: Any = None, config: Optional[QuantConfig] = None, *,
             example_inputs: Any = None, inplace: bool = False,
             graph_mode: bool = False) -> nn.Module:
    """Return an int8 version of ``model`` (a copy unless ``inplace=True``).

    ``config``: ``StaticInt8Config()`` (default; needs ``calib_data``) or ``DynamicInt8Config()``.
    ``calib_data``: a list / DataLoader / generator of model inputs, or a function calling the
    model (then ``example_inputs`` is needed too). ``graph_mode=True`` compiles the result with
    the cpuboost backend. ``cpuboost.report_of(result)`` lists every int8 layer with its SQNR,
    what stayed in float and why.
    """
    cfg = resolve(config)
    data = CalibrationData(calib_data, example_inputs)
    _check_data(cfg, data)
    prepared = prepare_model(model, cfg, data.first_call(), inplace)
    if not cfg.dynamic:
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
    observers: Optional[dict[str, Observer]] = None
    handles: list = field(default_factory=list)
    calib_seconds: float = 0.0


def prepare_model(model: nn.Module, cfg: QuantConfig, first, inplace: bool) -> Prepared:
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
    targets = _targets(work, cfg, rec)
    if not targets:
        _nothing_quantized(rec)
    prepared = Prepared(work, cfg, hw, report, first, reference, flow, targets, rec)
    if not cfg.dynamic:
        prepared.observers, prepared.handles = observe_inputs(
            prepared.targets, lambda name: make_observer(cfg.observer, name, cfg.percentile))
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
    qmax = _activation_qmax(p.hw)
    floats = _convert(work, p.targets, p.observers, p.cfg, qmax, p.flow, p.rec)
    if qmax != 255:
        p.rec.notes.append(f"activations use 0..{qmax}: without VNNI, u8 x s8 products "
                           "saturate at full range")
    sqnr = _layer_sqnr(work, floats, p.first) if p.first is not None else {}
    for name, (q, f) in floats.items():
        measured = f" (SQNR {sqnr[name]:.1f} dB)" if name in sqnr else (
            " (not run on the first input)" if p.first is not None else "")
        p.rec.apply(f"{name}: {type(f).__name__} -> int8{measured}")
    del floats
    p.rec.seconds = time.perf_counter() - t0
    if p.cfg.fuse_activations and p.flow is not None:
        _timed(p.report, "fuse_activations",
               lambda r: fuse_pointwise(work, PassContext(OptimizeConfig(), p.hw, r, p.flow)))
    if graph_mode:
        _compile(work, p.hw, p.report)
    if p.first is not None:
        p.report.accuracy = _output_check(p.reference, run_sample(work, p.first, _FIRST))
    p.report.weight_bytes_after = weight_bytes(work)
    attach(work, p.report)
    if _env.verbose():
        print(p.report)
    return work


def resolve(config) -> QuantConfig:
    if config is None:
        return StaticInt8Config()
    if not isinstance(config, (StaticInt8Config, DynamicInt8Config)):
        raise ConfigError(f"config must be a StaticInt8Config or DynamicInt8Config, got "
                          f"{type(config).__name__}.")
    return config


def _check_data(cfg: QuantConfig, data: CalibrationData) -> None:
    if not cfg.dynamic and not data.given:
        raise ConfigError(
            "static int8 needs calibration data to fix activation ranges: pass calib_data= (a "
            "list of inputs, a DataLoader, or a function calling the model), or use "
            "config=DynamicInt8Config(), which needs none.")
    if data.func is not None and data.example is None:
        raise ConfigError("calib_data is a function, so pass example_inputs= too (one input "
                          "the model accepts): it shows which layers run and feeds the checks.")


def _activation_qmax(hw: CpuFeatures) -> int:
    """255, or 127 on x86 without VNNI: there oneDNN multiplies u8 x s8 with vpmaddubsw, whose
    int16 sums saturate at full range (the reduce_range of PyTorch's fbgemm recipes)."""
    if hw.arch in ("x86_64", "AMD64") and not hw.flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return 127
    return 255


def _timed(report: OptimizationReport, name: str, run) -> None:
    rec = report.record(name)
    t0 = time.perf_counter()
    run(rec)
    rec.seconds = time.perf_counter() - t0


def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, (FusedLinear, nn.Linear)) or is_hf_conv1d(m):
        return "linear"
    if isinstance(m, (FusedConv,) + _CONVS):
        return "conv"
    if isinstance(m, (FusedConvTranspose, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed"
    return None


def _targets(model: nn.Module, cfg: QuantConfig, rec: PassRecord) -> dict[str, nn.Module]:
    """Modules to quantize, by name (a module registered twice is taken once)."""
    parents, found, seen = module_parents(model), {}, set()
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is None or id(m) in seen:
            continue
        seen.add(id(m))
        pattern = next((p for p in cfg.skip if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            rec.skip(name, f"kept in float: matches skip pattern {pattern!r}")
        elif kind == "transposed":
            rec.skip(name, "kept in float: torch has no oneDNN int8 ConvTranspose kernel")
        elif cfg.dynamic and kind == "conv":
            rec.skip(name, "dynamic int8 covers Linear layers; convs need static calibration")
        elif isinstance(m, _Fused) and m.backend != "aten":
            rec.skip(name, "already packed by cpuboost.optimize: quantize the original model")
        elif (why := why_not_packable(model, m, parents)) is not None:
            rec.skip(name, why)
        else:
            found[name] = m
    return found


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


def _float_parts(m: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight (out, in, ...) and bias of a float Linear/Conv (BatchNorm folded if it was)."""
    if isinstance(m, _Fused):
        w, b = m._folded_dense()
        return (w.t() if isinstance(m, FusedConv1DLinear) else w), b
    w = m.weight.detach()
    return (w.t() if is_hf_conv1d(m) else w), (None if m.bias is None else m.bias.detach())


def _int8_module(m, act, cfg, qmax: int, input_shape) -> _Int8:
    w, b = _float_parts(m)
    per_channel = cfg.weight_granularity == "per_channel"
    if _kind(m) == "linear":
        return Int8Linear(w, b, act, qmax, per_channel)
    padding = m.padding if isinstance(m, FusedConv) else _conv_padding(m)
    return Int8Conv(w, b, act, m.stride, padding, m.dilation, m.groups, qmax, per_channel,
                    input_shape=input_shape)


def _convert(model, targets, observers, cfg, qmax: int, flow: Optional[Dataflow],
             rec: PassRecord) -> dict[str, tuple[_Int8, nn.Module]]:
    """Swap each target for its int8 module. Returns name -> (int8, float module it replaced)."""
    done = {}
    for name, m in targets.items():
        act = None
        if observers is not None:
            obs = observers[name]
            if not obs.seen:
                rec.skip(name, "did not run during calibration, so its input range is unknown")
                continue
            act = affine_qparams(*obs.clip_range(), qmax, cfg.activation_symmetric)
        shape = flow.first_shape(m) if flow is not None else None
        q = _int8_module(m, act, cfg, qmax, shape)
        replace_module(model, m, q)
        if flow is not None:
            flow.rebind(m, q)
        bn = m.__dict__.get("_folded_bn")
        if bn is not None:  # the folded BatchNorm now belongs to the int8 module
            object.__setattr__(bn, "_producer", q)
        done[name] = (q, m)
    if not done:
        _nothing_quantized(rec)
    return done


def _nothing_quantized(rec: PassRecord):
    reasons = "; ".join(f"{w}: {why}" for w, why in rec.skipped[:3]) or "none found"
    raise UnsupportedRequestError(
        f"quantize found no Linear/Conv layer it could make int8 ({reasons}). Nothing was "
        "quantized; the model passed in was not changed.")


def _layer_sqnr(model, converted, first) -> dict[str, float]:
    """Each int8 layer's own error: its output vs the float layer's on the same input."""
    results: dict[str, float] = {}
    handles = []
    for name, (q, f) in converted.items():
        def hook(mod, args, out, name=name, f=f):
            if name not in results:
                results[name] = sqnr_db(f(*args), out)
        handles.append(q.register_forward_hook(hook))
    try:
        run_sample(model, first, _FIRST)
    finally:
        for h in handles:
            h.remove()
    return results


def _compile(model: nn.Module, hw: CpuFeatures, report: OptimizationReport) -> None:
    from cpuboost.compile.graph_mode import graph_mode
    for m in model.modules():
        if isinstance(m, _Int8):
            m.for_compile()
    _timed(report, "graph_mode", lambda rec: graph_mode(
        model, PassContext(OptimizeConfig(graph_mode=True), hw, rec)))


def _output_check(reference, output) -> str:
    s, c = sqnr_db(reference, output), cosine(reference, output)
    return f"output vs the original model on the first input: SQNR {s:.1f} dB, cosine {c:.5f}"


__all__ = ["Prepared", "convert_model", "prepare_model", "quantize", "resolve"]
