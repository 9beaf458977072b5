"""The numerics check: a pass that breaks outputs on the sample is dropped and reported."""
import dataclasses

import torch

import cpuboost
from cpuboost.hw import features
from cpuboost.nn import postops
from cpuboost.passes.fuse_pointwise import FusedAway
from tests.conftest import FP32_RTOL, rel_err, run, toy


def test_pass_that_breaks_numerics_is_dropped(monkeypatch):
    # Sabotage: a "relu" whose oneDNN post-op is really tanh. fuse_pointwise must be dropped.
    broken = dataclasses.replace(postops.POST_OPS["relu"], attr="tanh")
    monkeypatch.setitem(postops.POST_OPS, "relu", broken)
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
    broken = dataclasses.replace(postops.POST_OPS["relu"], attr="tanh")
    monkeypatch.setitem(postops.POST_OPS, "relu", broken)
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
    opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
    notes = cpuboost.report_of(opt).pass_named("autocast_scope").notes
    assert any("no native bf16" in n and "slower" in n for n in notes)
    assert cpuboost.report_of(opt).numerics.passed


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
