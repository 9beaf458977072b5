import importlib
import math

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn.postops import identify
from cpuboost.passes.fuse_pointwise import FusedAway
from tests.conftest import FP32_RTOL, rel_err


class LibraryGELU(nn.Module):
    """A library's own GELU (tanh formula), as transformers ships: found by what it computes."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_activation_found_by_behaviour():
    assert identify(LibraryGELU()).name == "gelu_tanh"
    assert identify(nn.GELU()).name == "gelu"
    assert identify(nn.Softmax(-1)) is None
    assert identify(nn.LayerNorm(3)) is None


def test_library_activation_is_fused():
    model = nn.Sequential(nn.Linear(8, 16), LibraryGELU(), nn.Linear(16, 4), nn.Tanh()).eval()
    x = torch.randn(3, 8)
    opt = cpuboost.optimize(model, sample_input=x)
    assert isinstance(opt[1], FusedAway) and isinstance(opt[3], FusedAway)
    assert opt[0].post_op.name == "gelu_tanh" and opt[2].post_op.name == "tanh"
    assert rel_err(model(x), opt(x)) <= FP32_RTOL


@pytest.mark.measured_fusion
@pytest.mark.parametrize("fused_us, apart_us, fuses", [(1946.0, 1643.0, False), (900.0, 1000.0, True)])
def test_an_activation_measured_slower_fused_stays_apart(monkeypatch, fused_us, apart_us, fuses):
    """On AVX2 oneDNN's fused GELU cost more than GELU as its own op (1946 vs 1643 us measured):
    it stays apart there, with the timings in the report; ReLU is always fused."""
    fp = importlib.import_module("cpuboost.passes.fuse_pointwise")
    monkeypatch.setattr(fp, "post_op_costs", lambda name, dtype, threads: (fused_us * 1e-6,
                                                                          apart_us * 1e-6))
    prepack = importlib.import_module("cpuboost.passes.prepack")  # oneDNN, not the AVX2 kernel
    monkeypatch.setattr(prepack, "_linear_backend", lambda m, backend, ctx: backend)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.ReLU()).eval()
    x = torch.randn(3, 8)
    opt = cpuboost.optimize(model, sample_input=x)
    assert isinstance(opt[1], FusedAway) == fuses and isinstance(opt[3], FusedAway)
    skipped = cpuboost.report_of(opt).pass_named("fuse_pointwise").skipped
    assert bool(skipped) != fuses
    if not fuses:
        assert "gelu not fused: oneDNN's fused gelu measured slower" in skipped[0][1]
        assert "1946 vs 1643 us" in skipped[0][1]
    assert rel_err(model(x), opt(x)) <= FP32_RTOL


@pytest.mark.measured_fusion
def test_post_op_costs_are_measured_once_per_process():
    fp = importlib.import_module("cpuboost.passes.fuse_pointwise")
    from cpuboost.nn.postops import POST_OPS
    fp.post_op_costs.cache_clear()
    first = fp.post_op_costs("gelu", torch.float32, torch.get_num_threads())
    assert all(0 < t < 1 for t in first)
    assert fp.post_op_costs("gelu", torch.float32, torch.get_num_threads()) == first
    assert fp.fusing_pays(POST_OPS["relu"], torch.float32)  # never measured: always pays
    assert fp.post_op_costs.cache_info().currsize == 1


def test_shared_activation_fuses_only_if_every_call_can():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            y = self.act(self.a(x))
            return self.act(y + self.b(y))  # second call: input is an add, not a linear

    model, x = M().eval(), torch.randn(2, 4)
    opt = cpuboost.optimize(model, sample_input=x)
    rec = cpuboost.report_of(opt).pass_named("fuse_pointwise")
    assert not rec.applied and isinstance(opt.act, nn.ReLU)
    assert "also called on tensors" in rec.skipped[0][1]
    assert rel_err(model(x), opt(x)) <= FP32_RTOL


def test_activation_used_twice_by_fusable_producers_fuses():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 6), nn.Linear(6, 3), nn.SiLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model, x = M().eval(), torch.randn(2, 4)
    opt = cpuboost.optimize(model, sample_input=x)
    assert opt.a.post_op.name == "silu" and opt.b.post_op.name == "silu"
    assert rel_err(model(x), opt(x)) <= FP32_RTOL
