"""SmoothQuant: per-layer strength search that never makes a layer worse, fixes an outlier
channel, and survives recipes and save/load."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import ConfigError, DynamicInt8Config, StaticInt8Config
from cpuboost.nn.int8 import Int8Linear
from cpuboost.quant.smooth import ChannelStats, choose
from cpuboost.quantization import recipe_of
from cpuboost.verify import sqnr_db

TOLERANCE = 0.01


def _stats(x):
    stats = ChannelStats()
    stats.observe(x)
    return stats


@pytest.mark.parametrize("outlier", [1.0, 50.0])
def test_choice_is_never_worse_and_helps_outlier_channels(outlier):
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 3] *= outlier
    w = torch.randn(32, 64) * 0.1
    sm = choose(_stats(x), w, 255, False, True)
    assert sm.error_ratio <= 1.0
    if outlier > 1:
        assert sm.scale is not None and sm.error_ratio < 0.5


def test_smoothed_int8_linear_matches_float_and_its_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(40, 64)
    x[:, 5] *= 80
    sm = choose(_stats(x), lin.weight, 255, False, True)
    q = Int8Linear(lin.weight, lin.bias, sm.qparams, smooth=sm.scale)
    plain_scale = (x.max() - x.min()).item() / 255
    plain = Int8Linear(lin.weight, lin.bias, (plain_scale, round(-x.min().item() / plain_scale)))
    y = q(x)
    torch.testing.assert_close(y, q.reference_forward(x), atol=1e-4, rtol=1e-4)
    assert sqnr_db(lin(x), y) > sqnr_db(lin(x), plain(x)) + 6  # at least 4x less noise power


def test_smooth_quant_fixes_the_outlier_model_without_fallback(outlier_case, tmp_path):
    model, calib, top1 = outlier_case
    base = top1(model)
    q = cpuboost.quantize(model, calib, StaticInt8Config(smooth_quant=True))
    assert (base - top1(q)) / base <= TOLERANCE
    recipe = recipe_of(q)
    assert recipe.int8_layers() == ["fc1", "fc2", "fc3"] and recipe.layers["fc2"].smoothing
    recipe.save(tmp_path / "r.json")
    again = cpuboost.quantize(model, recipe=tmp_path / "r.json", example_inputs=calib[0])
    cpuboost.save_quantized(q, tmp_path / "m")
    loaded = cpuboost.load_quantized(lambda: type(model)().add_outlier().eval(), tmp_path / "m")
    x = calib[2]
    assert torch.equal(again(x), q(x)) and torch.equal(loaded(x), q(x))


def test_dynamic_smooth_quant_and_bad_requests(outlier_case):
    model, calib, top1 = outlier_case
    q = cpuboost.quantize(model, calib, DynamicInt8Config(smooth_quant=True, smooth_alpha=0.5))
    assert all(r.smooth_alpha in (None, 0.5) for r in recipe_of(q).layers.values())
    assert (top1(model) - top1(q)) / top1(model) <= TOLERANCE
    with pytest.raises(ConfigError, match="needs calib_data"):
        cpuboost.quantize(model, config=DynamicInt8Config(smooth_quant=True))
    with pytest.raises(ConfigError, match="smooth_alpha"):
        StaticInt8Config(smooth_quant=True, smooth_alpha=1.5)
