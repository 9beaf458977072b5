"""A model whose every floating-point parameter was packed keeps an empty one (nn.anchor)."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn.anchor import NAME
from cpuboost.nn.int8 import _Int8


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _olmo():
    """OLMo: LayerNorms without weights, so packing its Linears and table leaves no parameter."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OlmoConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=500)
    torch.manual_seed(0)
    return transformers.OlmoForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [
    lambda m, x: cpuboost.optimize(m, sample_input=x),
    lambda m, x: cpuboost.optimize(m),  # passes at the first call
    lambda m, x: cpuboost.quantize(m, config=cpuboost.DynamicInt8Config(), example_inputs=x),
], ids=["optimize", "optimize_deferred", "quantize_dynamic"])
def test_a_model_left_without_parameters_gets_an_anchor(make):
    model, x = _mlp(), torch.randn(4, 16)
    opt = make(model, x)
    with torch.no_grad():
        out = opt(x)  # (runs the deferred passes)
    assert torch.allclose(out, model(x), rtol=0.05, atol=0.05)
    anchor = next(opt.parameters())
    assert anchor is getattr(opt, NAME)
    assert (anchor.dtype, anchor.device.type, anchor.numel()) == (torch.float32, "cpu", 0)
    saved = opt.state_dict()
    assert NAME not in saved and all(k.split(".")[0] in ("0", "2") for k in saved)
    if not isinstance(opt[0], _Int8):  # (int8 layers load through load_quantized)
        opt.load_state_dict(model.state_dict())  # strict: no key missing or unexpected
    notes = [n for p in cpuboost.report_of(opt).passes for n in p.notes]
    assert any(n.startswith("no floating-point parameter was left") for n in notes)


def test_a_model_keeping_a_parameter_gets_none():
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32)).eval()
    opt = cpuboost.optimize(model, sample_input=torch.randn(4, 16))
    assert not hasattr(opt, NAME)
    assert next(opt.parameters()) is opt[1].weight


def test_generate_runs_on_a_model_whose_weights_were_all_packed():
    """Hugging Face's model.device reads the first parameter: generate() raised StopIteration."""
    model = _olmo()
    ids = torch.randint(5, 500, (1, 10))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt = cpuboost.optimize(model, sample_input=x)
    assert hasattr(opt, NAME)
    assert opt.device.type == "cpu" and opt.dtype == torch.float32
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=6, do_sample=False)
        out = opt.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)



def test_a_hugging_face_model_inside_another_gets_one_too():
    """OlmoModel inside OlmoForCausalLM answers .device from its parameters as well: it raised
    StopIteration, and torch.jit.trace (which reads every attribute of every module) with it."""
    model = _olmo()
    model.config.use_cache = False
    ids = torch.randint(5, 500, (1, 10))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    opt = cpuboost.optimize(model, sample_input=x)
    assert hasattr(opt.model, NAME) and opt.model.device.type == "cpu"
    assert not any(k.endswith(NAME) for k in opt.state_dict())
    opt.load_state_dict(model.state_dict())  # strict: the anchors are not missing keys
    with torch.no_grad():
        traced = torch.jit.trace(opt, example_kwarg_inputs=x, strict=False, check_trace=False)
        assert torch.allclose(traced(**x)["logits"], model(**x).logits, rtol=1e-4, atol=1e-5)
