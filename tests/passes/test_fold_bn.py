import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn import FoldedBatchNorm, FusedConvTranspose, FusedLinear
from tests.conftest import FP32_RTOL, rel_err


def _optimize(model, x, **kw):
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            torch.manual_seed(1)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    opt = cpuboost.optimize(model, sample_input=x, **kw)
    with torch.no_grad():
        assert rel_err(model(x), opt(x)) <= FP32_RTOL
    return opt, cpuboost.report_of(opt).pass_named("fold_bn")


def _skip_reasons(rec):
    return " | ".join(why for _, why in rec.skipped)


def test_linear_bn1d_folds():
    opt, rec = _optimize(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)), torch.randn(4, 8))
    assert rec.applied == ["0 <- 1"]
    assert isinstance(opt[0], FusedLinear) and isinstance(opt[1], FoldedBatchNorm)


def test_linear_bn1d_on_sequence_output_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(8, 5), nn.BatchNorm1d(5)

        def forward(self, x):  # (N, 5, 8) -> BN over dim 1, not over the linear's features
            return self.bn(self.fc(x))
    _, rec = _optimize(M(), torch.randn(2, 5, 8))
    assert not rec.applied and "not (N, C)" in _skip_reasons(rec)


def test_conv_transpose_bn_folds():
    opt, rec = _optimize(nn.Sequential(nn.ConvTranspose2d(4, 3, 2, stride=2), nn.BatchNorm2d(3)),
                         torch.randn(1, 4, 5, 5))
    assert rec.applied and isinstance(opt[0], FusedConvTranspose)


def test_bn_module_reused_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))
    _, rec = _optimize(M(), torch.randn(1, 3, 6, 6))
    assert not rec.applied and "more than once" in _skip_reasons(rec)


@pytest.mark.parametrize("setup, reason", [
    (lambda bn: bn.weight.data.zero_(), "exactly 0"),
    (lambda bn: bn.register_forward_hook(lambda *a: None), "forward hooks"),
])
def test_unfoldable_bn_is_skipped_with_reason(setup, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    setup(model[1])
    _, rec = _optimize(model, torch.randn(1, 3, 8, 8))
    assert not rec.applied and reason in _skip_reasons(rec)


def test_bn_without_running_stats_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    opt = cpuboost.optimize(model.eval(), sample_input=torch.randn(2, 3, 8, 8))
    assert "running statistics" in _skip_reasons(cpuboost.report_of(opt).pass_named("fold_bn"))


def test_folding_can_be_turned_off_per_kind():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 5),
                          nn.BatchNorm1d(5))
    _, rec = _optimize(model, torch.randn(2, 3, 8, 8), conv_bn_folding=False)
    assert rec.applied == ["3 <- 4"] and "disabled by conv_bn_folding" in _skip_reasons(rec)


@pytest.mark.parametrize("conv, reason", [
    (lambda: nn.Conv2d(3, 4, 2, padding="same"), "pads unevenly"),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), "padding_mode"),
    (lambda: nn.ConvTranspose2d(4, 4, 2, groups=2), "grouped ConvTranspose"),
])
def test_producer_the_fused_kernel_cannot_run_is_not_folded(conv, reason):
    model = nn.Sequential(conv(), nn.BatchNorm2d(4))
    cin = model[0].in_channels
    _, rec = _optimize(model, torch.randn(1, cin, 8, 8))
    assert not rec.applied and reason in _skip_reasons(rec)
