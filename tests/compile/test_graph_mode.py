"""optimize(..., graph_mode=True): forward compiled by the cpuboost backend."""
import pytest
import torch

import cpuboost
from tests.conftest import BF16_RTOL, rel_err, run, toy


@pytest.mark.parametrize("name", ["conv_bn", "custom_method", "mlp_bn"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_forward_matches(name, dtype):
    torch._dynamo.reset()
    case, model = toy(name)
    x = case.inputs(2)
    opt = cpuboost.optimize(model, dtype=dtype, graph_mode=True, sample_input=x)
    report = cpuboost.report_of(opt)
    assert report.numerics.passed, str(report)
    applied = report.applied("graph_mode")
    assert applied and "compiled with backend 'cpuboost'" in applied[0]
    assert report.pass_named("prepack") is None  # Inductor's freezing packs instead
    rtol = BF16_RTOL if dtype else 1e-4
    assert rel_err(run(model, case, x), run(opt, case, x).float()) <= rtol  # custom methods too


def test_hooks_fire_and_original_untouched():
    torch._dynamo.reset()
    case, model = toy("hooked")
    seen = []
    model.register_forward_hook(lambda *a: seen.append("root"))
    x = case.inputs(3)
    opt = cpuboost.optimize(model, graph_mode=True)
    assert "forward" not in model.__dict__
    seen.clear()
    with torch.no_grad():
        out = opt(*x)
    assert seen == ["root"] and rel_err(model(*x), out) <= 1e-4
