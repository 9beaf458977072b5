"""optimize(..., graph_mode=True): forward compiled by the cpuboost backend."""
import gc
import weakref

import pytest
import torch

import cpuboost
from cpuboost.compile.shared_constants import folded_constants
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


@pytest.mark.slow
def test_a_dynamic_batch_keeps_convolution_weights_packed():
    """A second batch size compiles a graph with a dynamic batch, where Inductor leaves the
    convolution weights plain (oneDNN reorders each on every call): cpuboost packs those whose
    oneDNN format is the same at every batch, and the results match eager at each batch."""
    torch._dynamo.reset()
    case, model = toy("residual")
    opt = cpuboost.optimize(model, graph_mode=True, sample_input=case.inputs(2))
    linear_pass = opt.__dict__["forward"].linear_pass
    with torch.no_grad():
        for batch in (2, 3, 6, 4):
            x = case.inputs(batch)
            assert rel_err(run(model, case, x), run(opt, case, x)) <= 1e-4
    assert opt.__dict__["forward"].graphs == 2  # batch 2, then one dynamic graph
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert linear_pass.convs_packed >= 1
    # on AVX2 CPUs some 3x3 convolutions run cpuboost's Winograd kernel instead, the same ones
    # in both graphs (its weight fits every batch)
    winograd = linear_pass.winograd // 2
    assert linear_pass.convs_packed + linear_pass.convs_plain + winograd == convs
    note = f"{linear_pass.convs_packed} packed for oneDNN (one weight format for batches 1-32)"
    assert any(note in n for n in cpuboost.report_of(opt).pass_named("graph_mode").notes)


def test_the_garbage_of_a_compile_is_collected_with_it_not_on_every_call():
    """Python's automatic collection is off during the calls, so only graph mode's own
    collection after a compiling call can free a reference cycle made before it."""
    import gc
    import weakref

    def garbage_cycle():
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        freed = []
        weakref.finalize(a, freed.append, True)
        return freed

    torch._dynamo.reset()
    case, model = toy("mlp_bn")
    x = case.inputs(2)
    opt = cpuboost.optimize(model, graph_mode=True)
    gc.disable()
    try:
        with torch.no_grad():
            compiled_now = garbage_cycle()
            opt(*x)  # compiles
            no_compile = garbage_cycle()
            opt(*x)
    finally:
        gc.enable()
    assert compiled_now == [True] and no_compile == []
    notes = cpuboost.report_of(opt).pass_named("graph_mode").notes
    assert any(n.startswith("garbage left by compiling, collected after each compile") for n in notes)


class _Node:
    other = None


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


@pytest.mark.parametrize("dtype", [None, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp32", "bf16"])
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


@pytest.mark.parametrize("torch_has", [(True, True), (False, False)],
                         ids=["callbacks", "older-torch"])
def test_backend_scope_is_in_effect_only_while_compiling(monkeypatch, torch_has):
    """Graph mode enters the backend's scope from Dynamo's compile-start callback (on a torch
    without compile callbacks or isolate_recompiles: around every call): a recompilation (a new
    batch size) is made with freezing and our passes, configs are as before after every call,
    and a compile of someone else's function never sees our scope."""
    import torch._inductor.config as cfg
    from cpuboost.compile import graph_mode
    monkeypatch.setattr(graph_mode, "_features", lambda: torch_has)
    compiled_with = []

    def recording_backend(gm, example_inputs):
        compiled_with.append((cfg.freezing, cfg.cpp_wrapper))
        return real_backend(gm, example_inputs)

    real_backend = graph_mode.cpuboost_backend
    monkeypatch.setattr(graph_mode, "cpuboost_backend", recording_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).eval()
    opt = cpuboost.optimize(model, graph_mode=True, sample_input=torch.randn(2, 16))
    forward = opt.__dict__["forward"]
    assert forward.graphs == 1 and forward.linear_pass.decisions  # compiled under the scope
    before = (cfg.freezing, cfg.cpp_wrapper, cfg.post_grad_custom_pre_pass)
    seen = []

    def spy(gm, example_inputs):  # another library's backend, compiling in the same process
        seen.append((cfg.freezing, cfg.post_grad_custom_pre_pass))
        return gm.forward

    other = torch.compile(lambda x: x * 2 + 1, backend=spy)
    with torch.no_grad():
        for batch in (2, 5, 7, 2):
            x = torch.randn(batch, 16)
            assert rel_err(model(x), opt(x)) <= 1e-4
            assert (cfg.freezing, cfg.cpp_wrapper, cfg.post_grad_custom_pre_pass) == before
            other(x)
    assert forward.graphs == 2  # the second batch size compiled one dynamic graph
    assert compiled_with == [(True, True), (True, True)]
    torch._dynamo.reset()  # clears Dynamo's callbacks too: the next compile must still get ours
    with torch.no_grad():
        assert rel_err(model(x), opt(x)) <= 1e-4
    assert compiled_with[2:] == [(True, True)]
    assert seen and all(s == (before[0], before[2]) for s in seen)


def test_a_call_on_another_thread_cannot_end_a_compile(monkeypatch):
    """Streams call one graph-mode model from several threads: the scope of a compile lives
    with the compiling thread, so calls finishing on another thread meanwhile leave it alone."""
    import threading
    import torch._inductor.config as cfg
    from cpuboost.compile import graph_mode
    compiled_with = []
    real_backend = graph_mode.cpuboost_backend

    def recording_backend(gm, example_inputs):
        compiled_with.append(cfg.freezing)
        out = real_backend(gm, example_inputs)
        compiled_with.append(cfg.freezing)
        return out

    monkeypatch.setattr(graph_mode, "cpuboost_backend", recording_backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                torch.nn.Linear(32, 4)).eval()
    small, big = torch.randn(3, 16), torch.randn(6, 16)
    opt = cpuboost.optimize(model, graph_mode=True, sample_input=small)
    done, outs = threading.Event(), {}

    def compile_new_shape():  # thread A: a recompilation that takes seconds
        with torch.no_grad():
            outs["big"] = opt(big)
        done.set()

    def call_compiled_shape():  # thread B: many short calls ending while A compiles
        with torch.no_grad():
            while True:
                outs["small"] = opt(small)
                outs["calls"] = outs.get("calls", 0) + 1
                if done.is_set():
                    break

    threads = [threading.Thread(target=compile_new_shape), threading.Thread(
        target=call_compiled_shape)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        assert rel_err(model(big), outs["big"]) <= 1e-4
        assert rel_err(model(small), outs["small"]) <= 1e-4
    assert outs["calls"] > 1 and len(compiled_with) == 4 and all(compiled_with)
    assert not cfg.freezing


@pytest.mark.slow
def test_each_instance_has_its_own_recompile_limit():
    """Dynamo's default limit of 8 graphs was per code object: once one instance of a class had
    compiled 8 graphs, a second instance of that class silently ran eager. Each graph-mode
    forward now has its own cache, so the second instance still compiles."""
    import torch._dynamo.config as dynamo_config
    torch._dynamo.reset()
    torch.manual_seed(0)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()

    first, second = cpuboost.optimize(make(), graph_mode=True), cpuboost.optimize(
        make(), graph_mode=True)
    # a graph per shape (config.patch: pytest's monkeypatch deletes a torch config on undo)
    with torch.no_grad(), dynamo_config.patch(automatic_dynamic_shapes=False):
        for batch in range(1, dynamo_config.recompile_limit + 2):
            first(torch.randn(batch, 8))
        second(torch.randn(3, 8))
    assert first.__dict__["forward"].graphs == dynamo_config.recompile_limit + 1
    assert second.__dict__["forward"].graphs == 1


def test_first_compiled_call_is_checked_without_sample_input(monkeypatch):
    """Without sample_input the first call compiles; its output is compared with the
    uncompiled forward's on a copy of the input, as optimize's check would with sample_input.
    A wrong graph (sabotaged here) is dropped: that call returns the uncompiled output and
    later calls run uncompiled, reported and warned."""
    from cpuboost.compile import graph_mode as gm_module
    real = gm_module.cpuboost_backend

    frozen = []

    def skewed(gm, example_inputs):
        compiled = real(gm, example_inputs)
        frozen.extend(weakref.ref(c) for w, c, _ in folded_constants()
                      if any(w is p for p in model.parameters()))

        def run_skewed(*args):
            outs = compiled(*args)
            return type(outs)(o * 1.1 if isinstance(o, torch.Tensor) and o.is_floating_point()
                              else o for o in outs)
        return run_skewed

    torch._dynamo.reset()
    case, model = toy("mlp_bn")
    x = case.inputs(4)
    ref = run(model, case, x)
    good = cpuboost.optimize(model, graph_mode=True)
    assert rel_err(ref, run(good, case, x)) <= 1e-4
    notes = cpuboost.report_of(good).pass_named("graph_mode").notes
    assert any("first call checked against the uncompiled model: ok" in n for n in notes)
    monkeypatch.setattr(gm_module, "cpuboost_backend", skewed)
    del good
    torch._dynamo.reset()
    bad = cpuboost.optimize(model, graph_mode=True)
    with pytest.warns(RuntimeWarning, match="compiled outputs failed the check"):
        assert rel_err(ref, run(bad, case, x)) <= 1e-4
    assert rel_err(ref, run(bad, case, x)) <= 1e-4
    record = cpuboost.report_of(bad).pass_named("graph_mode")
    assert record.dropped and "FAILED" in record.dropped
    assert any("compiled with backend 'cpuboost'" in a for a in record.applied)  # what it tried
    assert bad.__dict__["forward"].failed
    gc.collect()  # the dropped graphs went with their frozen weights, the model still here
    assert frozen and all(c() is None for c in frozen)


def test_first_call_check_leaves_a_forward_changing_its_buffers_one_step_on():
    """The uncompiled reference run of the first-call check advanced a step counter the
    forward keeps in a buffer: the user's first call saw it at 2 (and was dropped as a
    mismatch), the second at 3."""
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.fc(x) * self.calls

    torch._dynamo.reset()
    model, x = Counting().eval(), torch.randn(2, 8)
    with torch.no_grad():
        expected = [model.fc(x) * step for step in (1, 2)]
        fast = cpuboost.optimize(model, graph_mode=True)
        fast.calls.zero_()
        outs = [fast(x), fast(x)]
    assert float(fast.calls) == 2
    assert all(rel_err(e, o) <= 1e-5 for e, o in zip(expected, outs))
    record = cpuboost.report_of(fast).pass_named("graph_mode")
    assert not record.dropped
    assert any("first call checked against the uncompiled model: ok" in n for n in record.notes)
