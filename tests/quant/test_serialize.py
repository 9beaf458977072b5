"""save_quantized / load_quantized: safetensors + JSON, no pickle; the loaded model computes
exactly what the saved one did; damaged or mismatched files raise clearly."""
import json

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import DynamicInt8Config, PackageError
from cpuboost.testing import TOY_MODELS, build_eval
from tests.conftest import run, toy


def _roundtrip(name, tmp_path, config=None, calib=True):
    case, model = toy(name)
    torch.manual_seed(1)
    data = [case.inputs(4) for _ in range(3)] if calib else None
    q = cpuboost.quantize(model, data, config, example_inputs=case.inputs(4))
    cpuboost.save_quantized(q, tmp_path / "m")
    loaded = cpuboost.load_quantized(lambda: build_eval(TOY_MODELS[name], seed=7), tmp_path / "m")
    return case, q, loaded


@pytest.mark.parametrize("name", ["conv_bn", "conv1d_3d", "residual", "transformer_encoder",
                                  "custom_method", "recommender"])
def test_loaded_model_computes_what_was_saved(name, tmp_path):
    case, q, loaded = _roundtrip(name, tmp_path)
    x = case.inputs(3)
    for a, b in zip(torch.utils._pytree.tree_leaves(run(q, case, x)),
                    torch.utils._pytree.tree_leaves(run(loaded, case, x))):
        assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors",
                                                                  "quantization.json"]
    assert cpuboost.quantization.recipe_of(loaded).int8_layers() == \
        cpuboost.quantization.recipe_of(q).int8_layers()


def test_dynamic_roundtrip(tmp_path):
    case, q, loaded = _roundtrip("mlp_bn", tmp_path, DynamicInt8Config(), calib=False)
    x = case.inputs(5)
    assert torch.equal(run(q, case, x), run(loaded, case, x))


@pytest.fixture
def saved(tmp_path):
    _roundtrip("conv_bn", tmp_path)
    return tmp_path / "m"


def _ctor():
    return build_eval(TOY_MODELS["conv_bn"])


def test_altered_or_truncated_tensors_are_refused(saved):
    file = saved / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="truncated or altered"):
        cpuboost.load_quantized(_ctor, saved)
    file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PackageError, match="truncated or altered"):
        cpuboost.load_quantized(_ctor, saved)


def test_bad_manifest_is_refused(saved):
    manifest = saved / "quantization.json"
    manifest.write_text("{not json")
    with pytest.raises(PackageError, match="cannot read"):
        cpuboost.load_quantized(_ctor, saved)
    manifest.write_text(json.dumps({"format": "other"}))
    with pytest.raises(PackageError, match="not a cpuboost int8 model"):
        cpuboost.load_quantized(_ctor, saved)
    with pytest.raises(PackageError, match="cannot read"):
        cpuboost.load_quantized(_ctor, saved / "nowhere")


def test_another_architecture_is_refused(saved):
    with pytest.raises(PackageError, match="does not have"):
        cpuboost.load_quantized(lambda: nn.Sequential(nn.Linear(3, 3)).eval(), saved)

    def wider():
        model = _ctor()
        model.fc = nn.Linear(4, 7)
        return model
    with pytest.raises(PackageError, match="weight shape"):
        cpuboost.load_quantized(wider, saved)


def test_only_quantized_models_are_saved(tmp_path):
    case, model = toy("mlp_bn")
    with pytest.raises(cpuboost.InvalidModelError):
        cpuboost.save_quantized(model, tmp_path / "x")
