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


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_generate_runs_through_the_compiled_forward(dtype):
    """HF generate() calls the instance's forward at every step: those calls are compiled.
    New lengths do not compile a graph each (Dynamo marks the changing dim dynamic)."""
    torch._dynamo.reset()
    model = _tiny_gpt2()
    ids = torch.randint(5, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    opt = cpuboost.optimize(model, dtype=dtype, graph_mode=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = opt.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled, not silently eager
    assert counters["stats"]["unique_graphs"] <= 4  # not one per generated length
    notes = cpuboost.report_of(opt).pass_named("graph_mode").notes
    graphs = next(n for n in notes if n.startswith("graphs compiled so far"))
    assert "with dynamic shapes" in graphs and any(n.startswith("shape policy") for n in notes)
    if dtype is None:
        assert torch.equal(ref, out)
    else:  # bf16: greedy tokens may part ways once logits tie within bf16 rounding
        assert torch.equal(ref[:, :ids.shape[1] + 4], out[:, :ids.shape[1] + 4])


def test_no_copy_of_the_weights_is_kept():
    """Graph mode changes no module, so the result shares the original's submodules and
    weights instead of deep-copying them (freezing's constants are the only new weights)."""
    torch._dynamo.reset()
    case, model = toy("conv_bn")
    opt = cpuboost.optimize(model, graph_mode=True, sample_input=case.inputs(2))
    assert all(a is b for a, b in zip(model.parameters(), opt.parameters()))
    assert "forward" not in model.__dict__
    with pytest.raises(cpuboost.InvalidModelError):
        cpuboost.report_of(model)
    opt.register_forward_hook(lambda *a: None)  # the root's hooks are its own
    assert not model._forward_hooks
    assert cpuboost.report_of(opt).pass_named("remove_dropout") is None  # a module change
