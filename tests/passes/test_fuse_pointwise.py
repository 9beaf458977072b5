import math

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
