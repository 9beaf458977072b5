"""IPEX's quantization names (``ipex.quantization.prepare / convert`` and the default qconfig
mappings), mapped onto ``cpuboost.quantize``'s configs. Switching is a changed import::

    from cpuboost.quantization import prepare, convert, default_static_qconfig_mapping
    prepared = prepare(model, default_static_qconfig_mapping, example_inputs=x)
    for batch in calibration_batches:
        prepared(batch)
    model_int8 = convert(prepared)

A ``torch.ao.quantization`` QConfigMapping (what IPEX took) is translated too: its global
activation observer picks ``observer`` (Histogram / MinMax / Placeholder = dynamic), the weight
observer's qscheme picks per-channel or per-tensor, and modules mapped to ``None`` stay float.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from cpuboost.checks import as_call
from cpuboost.errors import ConfigError, InvalidModelError
from cpuboost.quant.autotune import autotune, recipe_of
from cpuboost.quant.config import DynamicInt8Config, QuantConfig, StaticInt8Config
from cpuboost.quant.quantize import Prepared, convert_model, prepare_model, resolve
from cpuboost.quant.recipe import Recipe

default_static_qconfig_mapping = StaticInt8Config()
default_dynamic_qconfig_mapping = DynamicInt8Config()
_PREPARED = "_cpuboost_prepared"


def prepare(model: nn.Module, configure: Any = default_static_qconfig_mapping,
            example_inputs: Any = None, inplace: bool = False, bn_folding: bool = True,
            example_kwarg_inputs: Optional[dict] = None) -> nn.Module:
    """A copy of ``model`` (unless inplace) whose calls record the ranges int8 needs; call it on
    calibration data, then pass it to :func:`convert`. Argument names are IPEX's."""
    cfg = qconfig_to_config(configure)
    if example_inputs is not None and example_kwarg_inputs is not None:
        raise ConfigError("pass example_inputs or example_kwarg_inputs, not both.")
    example = example_kwarg_inputs if example_kwarg_inputs is not None else example_inputs
    if example is None and not cfg.dynamic:
        raise ConfigError("prepare needs example_inputs= (one input the model accepts): it shows "
                          "which layers run, which BatchNorms fold and which activations fuse.")
    if not bn_folding:
        raise ConfigError("bn_folding=False is not supported: a BatchNorm folded into its conv is "
                          "exact in inference, and int8 convs need it folded.")
    prepared = prepare_model(model, cfg, None if example is None else as_call(example), inplace)
    object.__setattr__(prepared.work, _PREPARED, prepared)
    return prepared.work


def convert(model: nn.Module, inplace: bool = False, graph_mode: bool = False) -> nn.Module:
    """The int8 model for a model returned by :func:`prepare` and run on calibration data.
    The prepared model itself is converted (IPEX's ``inplace`` is accepted for compatibility:
    prepare already made the copy)."""
    prepared: Optional[Prepared] = getattr(model, _PREPARED, None)
    if prepared is None:
        raise InvalidModelError(
            f"{type(model).__name__} was not returned by cpuboost.quantization.prepare(...); "
            "prepare the model, run it on calibration data, then convert the prepared model.")
    object.__delattr__(model, _PREPARED)
    return convert_model(prepared, graph_mode)


class WoqWeightDtype:
    """IPEX's weight dtype names for weight-only quantization."""
    INT8 = "int8"
    INT4 = "int4"


class WoqWeightQScheme:
    UNDEFINED = "undefined"
    ASYMMETRIC = "asymmetric"
    SYMMETRIC = "symmetric"


def get_weight_only_quant_qconfig_mapping(weight_dtype: str = WoqWeightDtype.INT8,
                                          lowp_mode: Any = None, act_quant_mode: Any = None,
                                          group_size: int = -1,
                                          weight_qscheme: str = WoqWeightQScheme.UNDEFINED):
    """IPEX's weight-only qconfig for ``cpuboost.llm.optimize(model, quantization_config=...)``,
    as a ``cpuboost.llm.WoqConfig``. int8 is per output channel and symmetric (torch's kernel);
    int4 takes groups of 32-256 (its kernel has no per-channel form: ``group_size=-1`` means
    128). ``lowp_mode``: activations stay in the model's dtype (int8 activations are not
    supported); ``act_quant_mode`` is ignored for the same reason."""
    from cpuboost.llm.config import WoqConfig
    if lowp_mode is not None and "INT8" in str(lowp_mode).upper():
        raise ConfigError("lowp_mode INT8 (int8 activations) is not supported; weight-only "
                          "quantization keeps activations in the model's dtype.")
    if weight_dtype not in (WoqWeightDtype.INT8, WoqWeightDtype.INT4):
        raise ConfigError(f"weight_dtype must be WoqWeightDtype.INT8 or INT4, got "
                          f"{weight_dtype!r}.")
    if weight_dtype == WoqWeightDtype.INT8:
        return WoqConfig(bits=8, group_size=0)
    return WoqConfig(bits=4, group_size=128 if group_size in (-1, 0, None) else group_size,
                     symmetric=weight_qscheme == WoqWeightQScheme.SYMMETRIC)


def get_smooth_quant_qconfig_mapping(alpha: Optional[float] = 0.5, act_observer: Any = None,
                                     act_ic_observer: Any = None, wei_observer: Any = None,
                                     wei_ic_observer: Any = None,
                                     share_weight_observers: bool = True) -> StaticInt8Config:
    """IPEX's SmoothQuant qconfig, as a ``StaticInt8Config(smooth_quant=True)``: Linear layers'
    input channels are rescaled by ``max|x|^alpha / max|w|^(1-alpha)`` before int8 (``alpha``
    None: searched per layer, docs/quantize.md). cpuboost's SmoothQuant measures the per-channel
    ranges itself, so IPEX's observer arguments are refused rather than silently ignored. Each
    Linear divides its own input (cpuboost.quant.smooth), so layers sharing an input (q/k/v)
    get factors of their own whatever ``share_weight_observers`` says (IPEX's ``False``)."""
    given = [name for name, v in (("act_observer", act_observer),
                                  ("act_ic_observer", act_ic_observer),
                                  ("wei_observer", wei_observer),
                                  ("wei_ic_observer", wei_ic_observer)) if v is not None]
    if given:
        raise ConfigError(f"{given}: cpuboost's SmoothQuant measures the per-channel ranges "
                          "itself and takes no observers; choose the activation observer with "
                          "StaticInt8Config(smooth_quant=True, observer='histogram'|'minmax'|"
                          "'percentile').")
    return StaticInt8Config(smooth_quant=True, smooth_alpha=alpha)


def qconfig_to_config(configure: Any) -> QuantConfig:
    """Our config for IPEX's ``configure`` argument (one of ours, or a torch.ao mapping)."""
    if isinstance(configure, (StaticInt8Config, DynamicInt8Config)) or configure is None:
        return resolve(configure)
    global_qconfig = getattr(configure, "global_qconfig", configure)
    activation = getattr(global_qconfig, "activation", None)
    weight = getattr(global_qconfig, "weight", None)
    if activation is None or weight is None:
        raise ConfigError(
            f"cannot read a qconfig from {type(configure).__name__}; pass "
            "cpuboost.quantization.default_static_qconfig_mapping or "
            "default_dynamic_qconfig_mapping, a StaticInt8Config / DynamicInt8Config, or a "
            "torch.ao QConfigMapping.")
    skip = tuple(name for name, q in getattr(configure, "module_name_qconfigs", {}).items()
                 if q is None)
    act_cls, act_kw = _observer(activation)
    w_cls, w_kw = _observer(weight)
    per_tensor = "per_tensor" in str(w_kw.get("qscheme", "")) or (
        w_cls is not None and "PerChannel" not in w_cls.__name__)
    granularity = "per_tensor" if per_tensor else "per_channel"
    name = act_cls.__name__ if act_cls is not None else ""
    if "Placeholder" in name and act_kw.get("is_dynamic", False):
        return DynamicInt8Config(weight_granularity=granularity, skip=skip)
    observer = {"HistogramObserver": "histogram", "MinMaxObserver": "minmax",
                "MovingAverageMinMaxObserver": "minmax"}.get(name)
    if observer is None:
        raise ConfigError(f"activation observer {name or activation!r} has no cpuboost "
                          "equivalent; use HistogramObserver or MinMaxObserver, or a "
                          "StaticInt8Config(observer='histogram'|'minmax'|'percentile').")
    symmetric = "symmetric" in str(act_kw.get("qscheme", ""))
    return StaticInt8Config(weight_granularity=granularity, activation_symmetric=symmetric,
                            observer=observer, skip=skip)


def _observer(spec) -> tuple[Optional[type], dict]:
    """(observer class, keyword arguments) of an observer given with ``.with_args(...)``."""
    partial = getattr(spec, "p", None)
    if partial is not None and hasattr(partial, "func"):
        return partial.func, dict(partial.keywords or {})
    return (spec if isinstance(spec, type) else type(spec)), {}


__all__ = ["Recipe", "WoqWeightDtype", "WoqWeightQScheme", "autotune", "convert",
           "default_dynamic_qconfig_mapping", "default_static_qconfig_mapping",
           "get_weight_only_quant_qconfig_mapping", "prepare", "qconfig_to_config", "recipe_of"]
