"""The numerics check: a pass that breaks outputs on the sample is dropped and reported."""
import dataclasses
import warnings

import pytest
import torch

import cpuboost
from cpuboost.hw import features
from cpuboost.nn import fused, postops
from cpuboost.passes.fuse_pointwise import FusedAway
from tests.conftest import FP32_RTOL, rel_err, run, toy


def _sabotage_relu(monkeypatch):
    """A "relu" post-op that computes tanh, in oneDNN's call and in cpuboost's AVX2 kernel."""
    broken = dataclasses.replace(postops.POST_OPS["relu"], attr="tanh")
    monkeypatch.setitem(postops.POST_OPS, "relu", broken)
    monkeypatch.setitem(fused.AVX2_ACTS, "relu", fused.AVX2_ACTS["tanh"])


def test_pass_that_breaks_numerics_is_dropped(monkeypatch):
    # Sabotage: a "relu" whose oneDNN post-op is really tanh. fuse_pointwise must be dropped.
    _sabotage_relu(monkeypatch)
    case, model = toy("mlp_bn")
    x = case.inputs(8)
    opt = cpuboost.optimize(model, sample_input=x)
    report = cpuboost.report_of(opt)
    assert report.pass_named("fuse_pointwise").dropped
    assert not any(isinstance(m, FusedAway) for m in opt.modules())  # really not applied
    assert not report.pass_named("prepack").dropped and not report.pass_named("fold_bn").dropped
    assert report.numerics.passed and any("failed the numerics check" in w for w in report.warnings)
    assert rel_err(run(model, case, x), run(opt, case, x)) <= FP32_RTOL
    assert "DROPPED" in str(report)


def test_inplace_model_becomes_the_verified_one(monkeypatch):
    _sabotage_relu(monkeypatch)
    case, model = toy("mlp_bn")
    x = case.inputs(8)
    ref = run(model, case, x)
    opt = cpuboost.optimize(model, inplace=True, sample_input=x)
    assert opt is model
    assert rel_err(ref, run(model, case, x)) <= FP32_RTOL


def test_cpu_without_native_bf16_is_reported(monkeypatch):
    real = features.detect()
    fake = dataclasses.replace(real, flags=frozenset({"avx2"}))
    monkeypatch.setattr("cpuboost.api.detect", lambda: fake)
    case, model = toy("conv_bn")
    x = case.inputs(2)
    with pytest.warns(RuntimeWarning, match="without bf16 instructions.*avx2.*dtype=None"):
        opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
    report = cpuboost.report_of(opt)
    assert any("emulated" in w and "slower than float32" in w for w in report.warnings)
    assert report.numerics.passed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 (and bf16 where native) warn nothing
        cpuboost.optimize(model, sample_input=x)


def test_report_prints_every_pass():
    case, model = toy("conv_bn")
    text = str(cpuboost.report_of(cpuboost.optimize(model, sample_input=case.inputs(2))))
    for name in ("remove_dropout", "fold_bn", "prepack", "fuse_pointwise", "numerics: ok",
                 "weights:", "stem.0 <- stem.1"):
        assert name in text


def test_pass_that_makes_the_model_raise_is_dropped(monkeypatch):
    """A pass bug that makes the optimized model fail is not blamed on the user's input."""
    from cpuboost.nn import FusedLinear

    def broken(self, x):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(FusedLinear, "forward", broken)
    case, model = toy("hooked")
    x = case.inputs(4)
    ref = run(model, case, x)
    opt = cpuboost.optimize(model, inplace=True, sample_input=x)
    report = cpuboost.report_of(opt)
    assert report.pass_named("prepack").dropped and report.numerics.passed
    assert any("simulated kernel failure" in w for w in report.warnings)
    assert rel_err(ref, run(opt, case, x)) <= FP32_RTOL


def test_compare_blockwise_finds_the_worst_element_anywhere(monkeypatch):
    """Outputs are compared in float64 blocks (a 128 x 250002 logits tensor is 256 MB in
    float64): the worst difference, the scale and a NaN count wherever they are."""
    from cpuboost import verify
    monkeypatch.setattr(verify, "_CHUNK", 1000)
    ref = torch.linspace(-2, 2, 5500).reshape(55, 100)
    cand = ref.clone()
    cand[54, 99] += 0.01  # last block
    check = verify.compare(ref, cand, rtol=1e-3)
    assert abs(check.max_abs - 0.01) < 1e-6 and abs(check.max_rel - 0.005) < 1e-6
    assert not check.passed
    cand = ref.clone()
    cand[20, 3] = float("nan")  # a middle block; later blocks are fine
    assert not verify.compare(ref, cand, rtol=1.0).passed
    assert verify.compare(ref, ref.clone(), rtol=0.0).passed
    both = ref.clone()
    both[3, 4], both[40, 2] = float("nan"), float("inf")  # the original's own NaN/inf, matched
    assert verify.compare(both, both.clone(), rtol=0.0).passed
    worse = both.clone()
    worse[40, 2] = 1.0  # inf in the reference only
    assert not verify.compare(both, worse, rtol=1.0).passed
    wide = torch.randn(3, 2, 5000).transpose(0, 2)  # non-contiguous, blocks along every dim
    other = wide.clone()
    other[4321, 1, 2] += 0.5
    check = verify.compare(wide, other, rtol=1.0)
    assert abs(check.max_abs - 0.5) < 1e-6 and check.compared == 1


@pytest.mark.parametrize("inplace", [False, True])
def test_first_call_checks_the_deferred_passes(monkeypatch, inplace):
    """Without sample_input the passes run at the first call, which returns the original's
    output; the optimized model then runs that input again and a pass that breaks it is dropped
    as with sample_input (unchecked, ConvBERT's unfusable add raised on the second call)."""
    _sabotage_relu(monkeypatch)
    case, model = toy("mlp_bn")
    x = case.inputs(8)
    ref = run(model, case, x)
    opt = cpuboost.optimize(model, inplace=inplace)
    report = cpuboost.report_of(opt)
    assert "checked against the original's output" in report.pending
    for _ in range(2):
        assert rel_err(ref, run(opt, case, x)) <= FP32_RTOL
    report = cpuboost.report_of(opt)
    assert report.pending is None and report.numerics.passed
    assert report.pass_named("fuse_pointwise").dropped
    assert not report.pass_named("prepack").dropped
    assert report.pass_named("remove_dropout") is not None  # run at optimize(): still reported
    assert not any(isinstance(m, FusedAway) for m in opt.modules())
    assert (opt is model) == inplace


def test_first_call_replays_a_copy_of_its_arguments():
    """The check runs the optimized model on copies taken before the first call: an object the
    forward changes (generate()'s key/value cache) is changed once, by the call itself; an
    argument that cannot be copied leaves the passes unchecked, and the report says so."""
    class Cache:
        def __init__(self):
            self.seen = 0

    class Uncopyable(Cache):
        def __deepcopy__(self, memo):
            raise TypeError("no copies")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, cache):
            cache.seen += 1
            return self.fc(x) + cache.seen

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(2, 8)
    with torch.no_grad():
        ref = model(x, cache=Cache())
        for kind, checked in ((Cache, True), (Uncopyable, False)):
            opt, cache = cpuboost.optimize(model), kind()
            assert torch.equal(opt(x, cache=cache), ref)
            assert cache.seen == 1  # the replay ran on a copy
            report = cpuboost.report_of(opt)
            assert (report.numerics is not None and report.numerics.passed) == checked
            assert any("not checked" in w and "could not be copied" in w
                       for w in report.warnings) != checked
            assert rel_err(ref, opt(x, cache=kind())) <= FP32_RTOL


def test_first_call_of_a_hooked_model_is_not_replayed():
    """A second run would fire the user's hooks again on the first call: not replayed, the
    report says the passes went unchecked and why; the hook fired once."""
    case, model = toy("mlp_bn")
    fired = []
    model.register_forward_hook(lambda *a: fired.append(1))
    x = case.inputs(4)
    opt = cpuboost.optimize(model)
    fired.clear()
    run(opt, case, x)
    assert fired == [1]
    report = cpuboost.report_of(opt)
    assert report.numerics is None
    assert any("not checked" in w and "has forward hooks" in w for w in report.warnings)


def test_first_call_under_a_global_module_hook_is_not_replayed():
    """The same for a hook every module fires (register_module_forward_hook)."""
    case, model = toy("mlp_bn")
    x = case.inputs(4)
    opt = cpuboost.optimize(model)
    fired = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: fired.append(type(m).__name__))
    try:
        run(opt, case, x)
    finally:
        handle.remove()
    assert fired.count(type(model).__name__) == 1  # the root ran once
    report = cpuboost.report_of(opt)
    assert report.numerics is None
    assert any("not checked" in w and "global module hooks" in w for w in report.warnings)


def test_first_call_check_skips_a_copy_memory_cannot_hold(monkeypatch):
    """The check redoes failing passes from a copy of the model taken at the first call; where
    that copy would not fit (less than twice the model free: inplace=True is how users avoid
    copies) the passes stay unchecked and the report says why."""
    monkeypatch.setattr("cpuboost.api.available_bytes", lambda: 1000)
    case, model = toy("mlp_bn")
    x = case.inputs(4)
    opt = cpuboost.optimize(model, inplace=True)
    assert rel_err(run(model, case, x), run(opt, case, x)) <= FP32_RTOL
    report = cpuboost.report_of(opt)
    assert report.numerics is None
    assert any("not checked" in w and "would not fit comfortably in memory" in w
               for w in report.warnings)


def test_redo_after_a_failed_first_call_check_replays_fresh_copies(monkeypatch):
    """When the first-call check fails, the passes are redone one by one, each run on a new copy
    of the first call's arguments: a cache object that one run changed must not change the
    next run's output (else every pass would look broken and be dropped)."""
    _sabotage_relu(monkeypatch)

    class Counter:
        def __init__(self):
            self.seen = 0

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = torch.nn.Linear(8, 16), torch.nn.ReLU(), \
                torch.nn.Linear(16, 8)

        def forward(self, x, cache):
            cache.seen += 1
            return self.down(self.act(self.up(x))) + cache.seen

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x, Counter())
        opt = cpuboost.optimize(model)
        assert torch.equal(opt(x, Counter()), ref)
        assert rel_err(ref, opt(x, Counter())) <= FP32_RTOL
    report = cpuboost.report_of(opt)
    assert report.numerics.passed
    assert report.pass_named("fuse_pointwise").dropped
    assert not report.pass_named("prepack").dropped


def test_calls_from_other_threads_wait_for_the_first_call(monkeypatch):
    """Run alongside the first call, another thread's call saw modules folded and packed under
    it (half the model rewritten); it now waits, then runs the optimized model."""
    import sys
    import threading
    import time
    api = sys.modules["cpuboost.api"]
    case, model = toy("conv_bn")
    (x,), (other,) = case.inputs(2), case.inputs(2)
    with torch.no_grad():
        expected = model(other)
        opt = cpuboost.optimize(model)
    started, order = threading.Event(), []
    real = api._run_checked

    def slow_passes(*args, **kwargs):  # the window in which the other thread calls
        started.set()
        time.sleep(0.3)
        out = real(*args, **kwargs)
        order.append("passes done")
        return out
    monkeypatch.setattr(api, "_run_checked", slow_passes)
    result = {}

    def second():
        with torch.no_grad():
            result["out"] = opt(other)
        order.append("second call done")
    with torch.no_grad():
        first = threading.Thread(target=lambda: opt(x))
        first.start()
        assert started.wait(60)
        thread = threading.Thread(target=second)
        thread.start()
        first.join()
        thread.join()
    assert order == ["passes done", "second call done"]
    assert rel_err(expected, result["out"]) < FP32_RTOL
    assert cpuboost.report_of(opt).pass_named("fold_bn").applied
    copy_made_before = cpuboost.optimize(model)  # the stand-in's lock is not copied along
    import copy
    with torch.no_grad():
        assert rel_err(expected, copy.deepcopy(copy_made_before)(other)) < FP32_RTOL


class _Counting(torch.nn.Module):
    """A forward that advances a step counter held in a buffer (in place)."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(8, 16), torch.nn.ReLU(), \
            torch.nn.Linear(16, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.down(self.act(self.up(x))) * self.calls


@pytest.mark.parametrize("broken", [False, True], ids=["ok", "redo"])
def test_first_call_check_of_a_forward_changing_its_buffers(monkeypatch, broken):
    """The first call ran the original forward (counter 0 -> 1); the check then replayed the
    call on the optimized model from counter 1, which differs: it went unchecked. Now the
    buffers go back for the check (also through the pass-by-pass redo when a pass is broken)
    and are left where the user's call left them: every call sees the step the user expects."""
    if broken:
        _sabotage_relu(monkeypatch)
    torch.manual_seed(0)
    model, x = _Counting().eval(), torch.randn(4, 8)
    with torch.no_grad():
        plain = model.down(model.act(model.up(x)))
        opt = cpuboost.optimize(model)
        outs = [opt(x), opt(x)]
    assert float(opt.calls) == 2 and float(model.calls) == 0  # (the user's model: a copy)
    assert all(rel_err(plain * step, out) <= FP32_RTOL for step, out in zip((1, 2), outs))
    report = cpuboost.report_of(opt)
    assert report.numerics.passed and not any("not checked" in w for w in report.warnings)
    assert bool(report.pass_named("fuse_pointwise").dropped) == broken


def test_sample_input_check_leaves_the_user_s_buffers_alone():
    """optimize(sample_input=...) runs the original model for its reference: a counter the
    forward keeps moved in the user's model. The check's runs now put buffers back."""
    model, x = _Counting().eval(), torch.randn(4, 8)
    opt = cpuboost.optimize(model, sample_input=x)
    assert float(model.calls) == 0 and float(opt.calls) == 0
    assert cpuboost.report_of(opt).numerics.passed


class _CustomEntry(torch.nn.Module):
    """Inference through a method of its own that never calls forward (IPEX's known issue:
    conv+bn folding skipped there)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        raise RuntimeError("this model is called through infer()")

    def describe(self):
        return "conv-bn-fc"

    def infer(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_first_call_through_a_custom_method_that_never_calls_forward():
    """The deferred passes waited for forward, which never came: nothing was folded or packed
    (all of optimize's passes stayed pending). Now the model's own public methods stand in too:
    the first call of infer() runs the passes and checks them; a method that runs no part of
    the model (describe) does not count."""
    torch.manual_seed(0)
    model, x = _CustomEntry().eval(), torch.randn(2, 3, 16, 16)
    opt = cpuboost.optimize(model)
    report = cpuboost.report_of(opt)
    assert "forward or describe() or infer()" in report.pending
    assert opt.describe() == "conv-bn-fc" and report.pending is not None
    with torch.no_grad():
        out = opt.infer(x)
        assert rel_err(model.infer(x), out) <= FP32_RTOL
        assert rel_err(model.infer(x), opt.infer(x)) <= FP32_RTOL
    report = cpuboost.report_of(opt)
    assert report.pending is None and report.numerics.passed
    assert report.applied("fold_bn") == ["conv <- bn"] and len(report.applied("prepack")) == 2
    assert not [k for k in vars(opt) if k in ("forward", "infer", "describe")]  # stand-ins gone


def test_a_copy_made_before_the_first_custom_call_runs_its_own_passes():
    """deepcopy and pickle (torch.save) of an optimized model before its first call: each copy
    runs its own passes at its first call. Pickling failed for any model then (the pending
    passes held lambdas)."""
    import copy
    import pickle
    torch.manual_seed(0)
    model, x = _CustomEntry().eval(), torch.randn(2, 3, 16, 16)
    opt = cpuboost.optimize(model)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        with torch.no_grad():
            assert rel_err(model.infer(x), twin.infer(x)) <= FP32_RTOL
        assert cpuboost.report_of(twin).applied("fold_bn") == ["conv <- bn"]
    assert cpuboost.report_of(opt).pending is not None  # the original still waits


def test_only_the_model_s_own_methods_stand_in():
    """Installed libraries' classes (torch's, transformers') have many public methods that are
    not the user's inference path: only methods of the user's own classes stand in."""
    from cpuboost.api import _entry_points
    transformers = pytest.importorskip("transformers")

    class Tagged(torch.nn.Sequential):
        def tag(self):
            return "mine"

    assert _entry_points(Tagged(torch.nn.Linear(2, 2))) == ("tag",)
    bert = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert _entry_points(bert) == ()


class _Predicting(torch.nn.Module):
    """forward gives scores; predict, the user's entry point, calls it and returns labels."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(8, 16), torch.nn.ReLU(), \
            torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.down(self.act(self.up(x)))

    def predict(self, x):
        return self(x).argmax(-1)


def test_a_custom_method_that_calls_forward_is_checked_on_forward_s_output(monkeypatch):
    """predict() (labels) comes first and calls forward: the check replays and compares
    forward's scores at the float tolerance, not the labels, which a near-tie could flip
    (dropping passes that were right)."""
    import cpuboost.api as api
    seen = []
    compare = api.compare
    monkeypatch.setattr(api, "compare", lambda ref, out, rtol: seen.append(ref.dtype) or
                        compare(ref, out, rtol))
    torch.manual_seed(0)
    model, x = _Predicting().eval(), torch.randn(6, 8)
    opt = cpuboost.optimize(model)
    with torch.no_grad():
        assert torch.equal(opt.predict(x), model.predict(x))
    report = cpuboost.report_of(opt)
    assert seen == [torch.float32] and report.numerics.passed and report.pending is None
    assert report.applied("prepack")


def test_a_hooked_model_s_custom_method_is_not_replayed():
    """As for forward: a model with forward hooks is not replayed (the hooks would fire twice),
    also when its first call is a custom method that calls forward."""
    fired = []
    model = _Predicting().eval()
    model.register_forward_hook(lambda m, i, o: fired.append(1))
    opt = cpuboost.optimize(model)
    with torch.no_grad():
        opt.predict(torch.randn(3, 8))
    report = cpuboost.report_of(opt)
    assert len(fired) == 1 and report.numerics is None
    assert any("forward hooks" in w for w in report.warnings)
