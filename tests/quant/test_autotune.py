"""autotune: a model whose default int8 recipe misses the tolerance (one layer's input has an
outlier channel) is brought within it by keeping the fewest layers float; the recipe is saved,
edited and loaded back."""
import json

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import ConfigError
from cpuboost.quant.layers import Bf16Layer
from cpuboost.quantization import Recipe, autotune, recipe_of
from cpuboost.verify import sqnr_db
from tests.conftest import run, toy

TOLERANCE = 0.01


def test_default_recipe_misses_and_autotune_meets_the_tolerance(outlier_case, tmp_path):
    model, calib, top1 = outlier_case
    base = top1(model)
    default = cpuboost.quantize(model, calib)
    assert (base - top1(default)) / base > TOLERANCE  # the constructed failure is real
    path = tmp_path / "recipe.json"
    tuned = autotune(model, calib, top1, max_relative_loss=TOLERANCE, save_recipe=path)
    assert (base - top1(tuned)) / base <= TOLERANCE
    recipe = recipe_of(tuned)
    assert [n for n, r in recipe.layers.items() if r.dtype != "int8"] == ["fc2"]
    notes = cpuboost.report_of(tuned).pass_named("autotune").notes
    assert any("0 layer(s) in float" in n for n in notes)
    # the saved recipe rebuilds the same model without tuning or calibration
    again = cpuboost.quantize(model, recipe=path, example_inputs=calib[0])
    x = calib[1]
    assert torch.equal(again(x), tuned(x))
    saved = json.loads(path.read_text())
    assert saved["layers"]["fc2"]["dtype"] == "fp32"
    assert saved["layers"]["fc2"]["reason"].startswith("autotune")


def test_edited_recipe_is_applied(outlier_case, tmp_path):
    model, calib, _ = outlier_case
    q = cpuboost.quantize(model, calib)
    path = tmp_path / "r.json"
    recipe_of(q).save(path)
    data = json.loads(path.read_text())
    data["layers"]["fc3"]["dtype"] = "fp32"
    data["layers"]["fc1"]["input_scale"] *= 2
    path.write_text(json.dumps(data))
    edited = cpuboost.quantize(model, recipe=path, example_inputs=calib[0])
    assert isinstance(edited.fc3, nn.Linear)
    assert edited.fc1.x_scale == pytest.approx(2 * q.fc1.x_scale)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format="other"), "not a cpuboost quantization recipe"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["layers"]["fc1"].update(input_scale=-1.0), "positive finite"),
    (lambda d: d["layers"]["fc1"].update(output_scale=0.1, output_zero_point=300),
     "output_zero_point 300"),
    (lambda d: d["layers"]["fc1"].update(dtype="int4"), "dtype"),
    (lambda d: d["layers"]["fc1"].update(scale=1.0), "unexpected field"),
])
def test_bad_recipes_raise_clearly(outlier_case, tmp_path, edit, match):
    model, calib, _ = outlier_case
    data = recipe_of(cpuboost.quantize(model, calib)).to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        Recipe.load(path)


def test_recipe_and_config_conflict(outlier_case):
    model, calib, _ = outlier_case
    recipe = recipe_of(cpuboost.quantize(model, calib))
    with pytest.raises(ConfigError, match="not both"):
        cpuboost.quantize(model, config=cpuboost.DynamicInt8Config(), recipe=recipe)


def test_bf16_fallback_keeps_the_layer_in_bf16(outlier_case, tmp_path):
    model, calib, top1 = outlier_case
    base = top1(model)
    tuned = autotune(model, calib, top1, max_relative_loss=TOLERANCE, fallback_dtype="bf16")
    assert (base - top1(tuned)) / base <= TOLERANCE
    recipe = recipe_of(tuned)
    assert [(n, r.dtype) for n, r in recipe.layers.items() if r.dtype != "int8"] == [
        ("fc2", "bf16")]
    assert tuned.fc2.inner.weight.dtype == torch.bfloat16
    x = calib[0]
    assert tuned(x).dtype == torch.float32  # the layers around it see what they saw
    recipe.save(tmp_path / "r.json")
    again = cpuboost.quantize(model, recipe=tmp_path / "r.json", example_inputs=x)
    assert torch.equal(again(x), tuned(x))
    cpuboost.save_quantized(tuned, tmp_path / "m")
    loaded = cpuboost.load_quantized(lambda: type(model)().add_outlier().eval(), tmp_path / "m")
    assert torch.equal(loaded(x), tuned(x))
    with pytest.raises(ConfigError, match="fallback_dtype"):
        autotune(model, calib, top1, fallback_dtype="fp16")


def test_recipe_can_put_a_folded_conv_in_bf16(tmp_path):
    case, model = toy("conv_bn")  # conv_a: groups=2, padding="same", BatchNorm folded
    torch.manual_seed(1)
    calib = [case.inputs(4) for _ in range(3)]
    recipe = recipe_of(cpuboost.quantize(model, calib)).with_float(["conv_a"], "test", "bf16")
    q = cpuboost.quantize(model, recipe=recipe, example_inputs=calib[0])
    assert isinstance(q.conv_a, Bf16Layer) and q.conv_a.inner.groups == 2
    x = case.inputs(4)
    assert sqnr_db(run(model, case, x), run(q, case, x)) > 20
    cpuboost.save_quantized(q, tmp_path / "m")  # the folded BatchNorm must not apply twice
    loaded = cpuboost.load_quantized(lambda: toy("conv_bn")[1], tmp_path / "m")
    assert torch.equal(run(loaded, case, x), run(q, case, x))
