"""IPEX's quantization names: prepare -> calibrate by calling -> convert, and torch.ao
qconfig mappings translated into our configs."""
import pytest
import torch

import cpuboost
from cpuboost import ConfigError, DynamicInt8Config, InvalidModelError, StaticInt8Config
from cpuboost.nn.int8 import _Int8
from cpuboost.quantization import (convert, default_dynamic_qconfig_mapping,
                                   default_static_qconfig_mapping,
                                   get_smooth_quant_qconfig_mapping, prepare, qconfig_to_config)
from tests.conftest import run, toy


def _scales(model):
    return [m.x_scale for m in model.modules() if isinstance(m, _Int8)]


def test_prepare_calibrate_convert_equals_quantize():
    case, model = toy("conv_bn")
    torch.manual_seed(1)
    calib = [case.inputs(4) for _ in range(3)]
    prepared = prepare(model, default_static_qconfig_mapping, example_inputs=calib[0])
    with torch.no_grad():
        for x in calib:
            prepared(*x)
    q = convert(prepared)
    expected = cpuboost.quantize(model, calib)
    assert _scales(q) == _scales(expected)
    x = case.inputs(2)
    assert torch.equal(run(q, case, x), run(expected, case, x))
    with pytest.raises(InvalidModelError, match="prepare"):
        convert(q)  # converting twice, or a model that was never prepared


def test_dynamic_mapping_needs_no_calibration():
    case, model = toy("transformer_encoder")
    q = convert(prepare(model, default_dynamic_qconfig_mapping, example_inputs=case.inputs(2)))
    assert all(m.dynamic for m in q.modules() if isinstance(m, _Int8))


def test_smooth_quant_mapping_runs_smoothquant():
    """IPEX's get_smooth_quant_qconfig_mapping(alpha=...) through prepare/convert: the Linear
    layers get smoothing at that strength (it did not exist: AttributeError on switching)."""
    case, model = toy("transformer_encoder")
    torch.manual_seed(2)
    calib = [case.inputs(4) for _ in range(3)]
    assert get_smooth_quant_qconfig_mapping(alpha=0.6) == StaticInt8Config(smooth_quant=True,
                                                                          smooth_alpha=0.6)
    prepared = prepare(model, get_smooth_quant_qconfig_mapping(alpha=0.6),
                       example_inputs=calib[0])
    with torch.no_grad():
        for x in calib:
            prepared(*x)
    q = convert(prepared)
    smoothed = [m for m in q.modules() if isinstance(m, _Int8) and m.smooth is not None]
    assert smoothed
    x = case.inputs(2)
    with torch.no_grad():
        assert cpuboost.verify.sqnr_db(run(model, case, x), run(q, case, x)) > 20
    with pytest.raises(ConfigError, match="takes no observers"):
        get_smooth_quant_qconfig_mapping(act_observer=object())


def test_torch_ao_mappings_translate():
    ao = pytest.importorskip("torch.ao.quantization")
    static = ao.QConfigMapping().set_global(ao.QConfig(
        activation=ao.HistogramObserver.with_args(reduce_range=False),
        weight=ao.PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                     qscheme=torch.per_channel_symmetric)))
    static.set_module_name("fc", None)
    assert qconfig_to_config(static) == StaticInt8Config(skip=("fc",))
    minmax = ao.QConfigMapping().set_global(ao.QConfig(
        activation=ao.MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric),
        weight=ao.MinMaxObserver.with_args(dtype=torch.qint8)))
    assert qconfig_to_config(minmax) == StaticInt8Config(
        observer="minmax", activation_symmetric=True, weight_granularity="per_tensor")
    dynamic = ao.QConfigMapping().set_global(ao.QConfig(
        activation=ao.PlaceholderObserver.with_args(dtype=torch.float, is_dynamic=True),
        weight=ao.PerChannelMinMaxObserver.with_args(dtype=torch.qint8)))
    assert qconfig_to_config(dynamic) == DynamicInt8Config()


def test_unusable_arguments_raise():
    case, model = toy("conv_bn")
    with pytest.raises(ConfigError, match="example_inputs"):
        prepare(model, default_static_qconfig_mapping)
    with pytest.raises(ConfigError, match="cannot read a qconfig"):
        prepare(model, {"activation": "histogram"}, example_inputs=case.inputs(2))
    with pytest.raises(ConfigError, match="bn_folding"):
        prepare(model, example_inputs=case.inputs(2), bn_folding=False)
