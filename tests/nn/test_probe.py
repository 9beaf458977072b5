"""Linear subclasses overriding forward: packed/quantized only where the forward is F.linear."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn.fused import FusedLinear
from cpuboost.nn.int8 import Int8Linear
from cpuboost.nn.probe import why_not_plain_linear


class MatmulLinear(nn.Linear):
    """transformers' FalconLinear: F.linear spelled as a matmul and an add."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class LoraLike(nn.Linear):
    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.delta = nn.Parameter(torch.zeros(n_out, n_in))  # zero now: equal on the probe

    def forward(self, x):
        return nn.functional.linear(x, self.weight + self.delta, self.bias)


class Raises(nn.Linear):
    def forward(self, x):
        raise RuntimeError("needs a mask")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_matmul_spelling_is_a_linear(dtype, bias):
    assert why_not_plain_linear(MatmulLinear(24, 40, bias=bias).to(dtype)) is None


@pytest.mark.parametrize("cls, says", [
    (ScaledLinear, "with a forward that is not F.linear"),
    (LoraLike, "holds more than weight and bias"),
    (Raises, "which raised RuntimeError on a probe input"),
])
def test_anything_else_is_not(cls, says):
    assert says in why_not_plain_linear(cls(24, 40))


def _net(cls):
    torch.manual_seed(0)
    return nn.Sequential(cls(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_optimize_and_quantize_take_a_matmul_linear():
    model, x = _net(MatmulLinear), torch.randn(4, 16)
    opt = cpuboost.optimize(model, sample_input=x)
    assert isinstance(opt[0], FusedLinear) and cpuboost.report_of(opt).numerics.passed
    q = cpuboost.quantize(model, config=cpuboost.DynamicInt8Config(), example_inputs=x)
    assert isinstance(q[0], Int8Linear)


def test_optimize_keeps_a_linear_that_computes_something_else():
    model, x = _net(ScaledLinear), torch.randn(4, 16)
    opt = cpuboost.optimize(model, sample_input=x)
    assert type(opt[0]) is ScaledLinear and isinstance(opt[2], FusedLinear)
    skipped = dict(cpuboost.report_of(opt).pass_named("prepack").skipped)
    assert "not F.linear" in skipped["0"]
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


def test_llm_optimize_keeps_a_linear_that_computes_something_else():
    """llm.optimize swapped every Linear subclass: a scaled projection lost its scale."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=500)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    mlp = model.model.layers[0].mlp
    scaled = ScaledLinear(128, 64, bias=False)
    scaled.weight = mlp.down_proj.weight
    mlp.down_proj = scaled.eval()
    opt = cpuboost.llm.optimize(model, dtype=torch.float32)
    assert type(opt.model.layers[0].mlp.down_proj) is ScaledLinear
    ids = torch.randint(5, 500, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    skipped = dict(cpuboost.report_of(opt).pass_named("linears").skipped)
    assert "not F.linear" in skipped["model.layers.0.mlp.down_proj"]
