"""Every bad input raises a CpuBoostError subclass naming what was found and the fix, and the
user's model is left exactly as it was."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.errors import (ConfigError, CpuBoostError, InvalidModelError, SampleInputError,
                             TrainingModeError, UnsupportedDeviceError, UnsupportedDtypeError,
                             UnsupportedRequestError)
from cpuboost.hw import detect
from tests.conftest import toy


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    kinds, sd = snap
    return [type(m) for m in model.modules()] == kinds and all(
        torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_not_a_module():
    with pytest.raises(InvalidModelError, match="expects a torch.nn.Module, got dict"):
        cpuboost.optimize({"weight": torch.zeros(1)})
    assert issubclass(InvalidModelError, TypeError)


def test_meta_device():
    with torch.device("meta"):
        model = nn.Linear(4, 4).eval()
    with pytest.raises(UnsupportedDeviceError, match="on meta.*to_empty"):
        cpuboost.optimize(model)


def test_training_mode_without_optimizer():
    case, model = toy("conv_bn")
    model.train()
    snap = _snapshot(model)
    with pytest.raises(TrainingModeError, match=r"training mode.*model.eval\(\)"):
        cpuboost.optimize(model, sample_input=case.inputs(2), inplace=True)
    assert _unchanged(model, snap) and model.training


def test_ipex_training_call_says_training_is_not_supported():
    """IPEX's training flow, ``ipex.optimize(model, optimizer=opt)`` on a model in train mode
    (positionally too: IPEX's third argument is the optimizer): the error names the optimizer
    and what to do, before the training-mode one, and changes nothing."""
    case, model = toy("conv_bn")
    model.train()
    snap = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in (lambda: cpuboost.optimize(model, optimizer=opt, dtype=torch.bfloat16),
                 lambda: cpuboost.optimize(model, torch.bfloat16, opt)):
        with pytest.raises(UnsupportedRequestError, match=r"optimizer=SGD.*not supported yet.*"
                                                          r"cpuboost.optimize\(model.eval\(\)\)"):
            call()
    assert _unchanged(model, snap) and model.training


def test_sample_input_rejected_keeps_model():
    case, model = toy("conv_bn")
    snap = _snapshot(model)
    with pytest.raises(SampleInputError, match=r"raised RuntimeError on sample_input.*\(2, 5\)"):
        cpuboost.optimize(model, sample_input=torch.randn(2, 5), inplace=True)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "bf16"])
def test_unsupported_dtype(dtype):
    _, model = toy("hooked")
    with pytest.raises(UnsupportedDtypeError, match="torch.bfloat16"):
        cpuboost.optimize(model, dtype=dtype)


@pytest.mark.skipif(detect().native_fp16, reason="this CPU supports fp16")
def test_fp16_without_native_support_is_a_clear_error():
    _, model = toy("hooked")
    with pytest.raises(UnsupportedDtypeError, match="native fp16.*dtype=torch.bfloat16"):
        cpuboost.optimize(model, dtype=torch.float16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(level="O3"), "level='O3' is not supported"),
    (dict(config="O1"), "config must be a cpuboost.OptimizeConfig"),
    (dict(config=cpuboost.OptimizeConfig(), weights_prepack=False), "either config= or keyword"),
    (dict(config=cpuboost.OptimizeConfig(), auto_kernel_selection=True), "measure_kernels=True"),
])
def test_bad_options(kwargs, match):
    _, model = toy("hooked")
    with pytest.raises(ConfigError, match=match):
        cpuboost.optimize(model, **kwargs)


def test_report_of_unoptimized_model():
    with pytest.raises(InvalidModelError, match="carries no cpuboost report"):
        cpuboost.report_of(nn.Linear(2, 2))


def test_every_error_is_a_cpuboost_error():
    for cls in (InvalidModelError, UnsupportedDeviceError, UnsupportedDtypeError,
                TrainingModeError, SampleInputError, ConfigError):
        assert issubclass(cls, CpuBoostError)


def test_packed_module_refuses_to_move():
    case, model = toy("hooked")
    opt = cpuboost.optimize(model, sample_input=case.inputs(2))
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        opt.to(torch.float64)


def test_explicit_prepack_oneDNN_cannot_run_raises_before_touching(monkeypatch):
    import dataclasses
    from cpuboost.errors import UnsupportedRequestError
    fake = dataclasses.replace(detect(), mkldnn=False)
    monkeypatch.setattr("cpuboost.api.detect", lambda: fake)
    case, model = toy("conv_bn")
    snap = _snapshot(model)
    with pytest.raises(UnsupportedRequestError, match="weights_prepack=True was asked for"):
        cpuboost.optimize(model, weights_prepack=True, inplace=True, sample_input=case.inputs(2))
    assert _unchanged(model, snap)
    # left to its default, the same situation is skipped and reported, and stays correct
    opt = cpuboost.optimize(model, sample_input=case.inputs(2))
    notes = cpuboost.report_of(opt).pass_named("prepack").notes
    assert any("oneDNN cannot run" in n for n in notes) and cpuboost.report_of(opt).numerics.passed


def test_training_an_optimized_model_is_refused():
    case, model = toy("hooked")
    opt = cpuboost.optimize(model, sample_input=case.inputs(2))
    with pytest.raises(RuntimeError, match="packed for inference"):
        opt.train()
    opt.eval()  # still fine
