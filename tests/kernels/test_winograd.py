"""cpuboost::conv3x3_winograd (F(4x4, 3x3) on AVX2) against float64 F.conv2d, and the places that
use it: FusedConv's "winograd" backend (eager) and the compile backend's graph pass."""
import copy
import importlib
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cpuboost
from cpuboost.kernels import (AVX2_ACTS, gemm_ops, gemm_unavailable, unpack_winograd,
                              winograd_pack)
from cpuboost.nn import POST_OPS, FusedConv, set_backend
from cpuboost.passes.winograd import why_not_winograd, winograd_pays
from tests.conftest import rel_err, same_at_every_thread_count

needs_kernel = pytest.mark.skipif(not gemm_ops(), reason=f"kernel unavailable: {gemm_unavailable()}")
# The transforms' float32 rounding (constants up to 8, sums of up to 36 terms per point): measured
# 0.6-4e-6 of the output's largest value over these cases; direct convolution is ~1e-6.
TOL = 2e-5


def _case(n, c, oc, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g), torch.randn(oc, c, 3, 3, generator=g) / (9 * c) ** 0.5,
            torch.randn(oc, generator=g))


def _ref(x, w, b, pad, add=None, act="none"):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=pad)
    return POST_OPS[act].reference(y if add is None else y + add.double())


def _run(x, w, b, pad, add=None, act="none"):
    return torch.ops.cpuboost.conv3x3_winograd(x, winograd_pack(w), b, add, w.shape[0],
                                               list(pad), AVX2_ACTS[act])


@needs_kernel
@pytest.mark.parametrize("n, c, oc, h, w", [(1, 8, 8, 1, 1), (1, 8, 8, 4, 4), (2, 16, 24, 9, 6),
                                            (1, 64, 40, 13, 11), (3, 8, 32, 7, 7),
                                            (1, 256, 64, 14, 14), (1, 32, 16, 57, 30)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("pad", [(1, 1), (0, 0), (2, 1)], ids=lambda p: f"pad{p[0]}{p[1]}")
def test_matches_float64_reference(n, c, oc, h, w, pad):
    """Images not a multiple of the 4x4 tile (the partial tiles are computed, never stored),
    output channels around the 16-wide panel, K past the 256 block of the GEMM."""
    if h + 2 * pad[0] < 3 or w + 2 * pad[1] < 3:
        pytest.skip("no output")
    x, wt, b = _case(n, c, oc, h, w)
    out = _run(x, wt, b, pad)
    ref = _ref(x, wt, b, pad)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(ref, out) <= TOL


@needs_kernel
@pytest.mark.parametrize("act", sorted(AVX2_ACTS))
def test_bias_residual_and_activation_in_registers(act):
    x, w, b = _case(2, 16, 24, 10, 9, seed=1)
    add = torch.randn(2, 24, 10, 9)
    assert rel_err(_ref(x, w, b, 1, add, act), _run(x, w, b, (1, 1), add, act)) <= TOL
    assert rel_err(_ref(x, w, None, 1, None, act), _run(x, w, None, (1, 1), None, act)) <= TOL


@needs_kernel
def test_any_input_layout_and_an_empty_batch():
    x, w, b = _case(2, 16, 16, 12, 12)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(_run(x, w, b, (1, 1)), _run(cl, w, b, (1, 1)))
    assert _run(x[:0], w, b, (1, 1)).shape == (0, 16, 12, 12)


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    x, w, b = _case(2, 32, 48, 30, 30)
    packed = winograd_pack(w)
    assert same_at_every_thread_count(
        lambda: torch.ops.cpuboost.conv3x3_winograd(x, packed, b, None, 48, [1, 1], 1))


@needs_kernel
def test_large_inputs_run_in_tile_blocks():
    """Tiles are transformed in blocks of a few MB: a batch of 4 at 64x64 takes several."""
    x, w, b = _case(4, 64, 64, 64, 64)
    assert rel_err(_ref(x, w, b, 1), _run(x, w, b, (1, 1))) <= TOL


@needs_kernel
def test_bad_arguments_say_what_is_wrong():
    x, w, b = _case(1, 16, 16, 8, 8)
    packed = winograd_pack(w)
    op = torch.ops.cpuboost.conv3x3_winograd
    with pytest.raises(RuntimeError, match="input has 24 channels, the weight expects 16"):
        op(torch.randn(1, 24, 8, 8), packed, b, None, 16, [1, 1], 0)
    with pytest.raises(RuntimeError, match="4-d float32 input"):
        op(x.double(), packed, b, None, 16, [1, 1], 0)
    with pytest.raises(RuntimeError, match="not packed by cpuboost.kernels.winograd_pack"):
        op(x, w, b, None, 16, [1, 1], 0)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        op(torch.randn(1, 12, 8, 8), winograd_pack(torch.randn(16, 12, 3, 3)), b, None, 16,
           [1, 1], 0)
    with pytest.raises(RuntimeError, match="padding must be two values in 0..2"):
        op(x, packed, b, None, 16, [3, 3], 0)
    with pytest.raises(RuntimeError, match="leaves no output"):
        op(torch.randn(1, 16, 1, 1), packed, b, None, 16, [0, 0], 0)
    with pytest.raises(RuntimeError, match="bias must be float32 with 16 values"):
        op(x, packed, torch.randn(8), None, 16, [1, 1], 0)
    with pytest.raises(RuntimeError, match="added tensor must be float32 of the output's shape"):
        op(x, packed, b, torch.randn(1, 16, 1, 1), 16, [1, 1], 0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        op(x, packed, b, None, 16, [1, 1], 42)
    with pytest.raises(ValueError, match=r"\[out, in, 3, 3\] weight"):
        winograd_pack(torch.randn(16, 16, 5, 5))


@needs_kernel
def test_packed_weight_reads_back_as_the_weight():
    w = torch.randn(40, 24, 3, 3)
    assert (unpack_winograd(winograd_pack(w), 40) - w).abs().max() <= 1e-6 * w.abs().max()


def test_where_it_pays_follows_the_measured_table():
    assert winograd_pays(64, 64, 56, 56) and winograd_pays(512, 512, 14, 14)
    assert winograd_pays(256, 256, 7, 7) and winograd_pays(64, 64, 4, 4)
    assert not winograd_pays(512, 512, 7, 7)  # 4 tiles: 1.09-1.25x, not worth 4x the weight
    assert not winograd_pays(512, 512, 4, 4) and not winograd_pays(256, 256, 4, 4)
    assert winograd_pays(512, 512, 7, 7, batch=2)
    assert not winograd_pays(8, 8, 56, 56) and winograd_pays(8, 8, 28, 28)
    assert not winograd_pays(16, 16, 112, 112) and winograd_pays(32, 32, 112, 112)
    assert winograd_pays(256, 256, 4, 4, batch=4) and not winograd_pays(256, 256, 4, 4, batch=2)
    ok = dict(kernel=(3, 3), stride=(1, 1), dilation=(1, 1), groups=1, padding=(1, 1),
              in_channels=16, out_channels=16, dtype=torch.float32)
    assert why_not_winograd(**ok) is None
    for change, why in [({"stride": (2, 2)}, "stride 1"), ({"kernel": (5, 5)}, "3x3"),
                        ({"groups": 2}, "grouped"), ({"padding": (3, 3)}, "padding"),
                        ({"in_channels": 12}, "multiples of 8"),
                        ({"dtype": torch.bfloat16}, "float32 only")]:
        assert why in why_not_winograd(**{**ok, **change})


class _Block(nn.Module):
    """A ResNet basic block: 3x3 conv + BN + ReLU, 3x3 conv + BN, residual add, ReLU."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.stem(x)
        z = self.act1(self.bn1(self.conv1(y)))
        z = self.act2(self.bn2(self.conv2(z)) + y)
        return self.down(z)


@needs_kernel
def test_optimize_runs_3x3_convolutions_on_the_kernel_with_bn_add_and_relu_fused():
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(2, 3, 20, 20)
    opt = cpuboost.optimize(model, sample_input=x)
    assert opt.conv1.backend == "winograd" and opt.conv1.post_op.name == "relu"
    assert opt.conv2.backend == "winograd" and opt.conv2.post_op.name == "relu"  # add + relu
    assert opt.stem.backend == "onednn"  # 3 input channels
    assert opt.down.backend == "onednn"  # stride 2
    with torch.no_grad():
        assert rel_err(model(x), opt(x)) <= TOL
    assert "FusedConv (winograd" in str(cpuboost.report_of(opt))


@needs_kernel
def test_fused_conv_winograd_keeps_its_weight_and_state(monkeypatch):
    """The transformed weight is the only copy: .weight, state_dict, pickling, deepcopy and a
    move to another backend see the original weight (within float32 rounding); unpickled where
    the kernel cannot run, it falls back to aten."""
    torch.manual_seed(0)
    src = nn.Conv2d(16, 24, 3, padding=1)
    fused = FusedConv(src, (1, 1), torch.float32, "winograd").eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert rel_err(src(x), fused(x)) <= TOL
        assert (fused.weight - src.weight).abs().max() <= 1e-6
        assert set(fused.state_dict()) == {"weight", "bias"}
        fused.load_state_dict({"weight": src.weight * 2, "bias": src.bias})
        assert rel_err(F.conv2d(x, src.weight * 2, src.bias, padding=1), fused(x)) <= TOL
        fused.load_state_dict(src.state_dict())
        buf = io.BytesIO()
        torch.save(fused, buf)
        data = buf.getvalue()
        for clone in (copy.deepcopy(fused), torch.load(io.BytesIO(data), weights_only=False)):
            assert clone.backend == "winograd" and torch.equal(clone(x), fused(x))
        fused.post_op = POST_OPS["silu"]
        assert rel_err(F.silu(src(x)), fused(x)) <= TOL
        add = torch.randn(2, 24, 1, 1)  # broadcast: added apart from the kernel
        assert rel_err(F.silu(src(x) + add), fused(x, add)) <= TOL
        assert rel_err(F.silu(src(x[0])), fused(x[0])) <= TOL  # one unbatched image
        set_backend(fused, "onednn")
        assert rel_err(F.silu(src(x)), fused(x)) <= TOL
        monkeypatch.setattr(importlib.import_module("cpuboost.kernels"), "gemm_ops", lambda: False)
        loaded = torch.load(io.BytesIO(data), weights_only=False)
        assert loaded.backend == "aten" and rel_err(src(x), loaded(x)) <= TOL


@needs_kernel
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
def test_compiled_3x3_convolutions_run_the_kernel(dynamic):
    """Under the backend, oneDNN convolutions Inductor fused with ReLU or a residual add move to
    the kernel (a dynamic batch too: the transformed weight fits every batch); strided ones stay."""
    from torch._inductor import config as cfg
    torch.manual_seed(0)
    model = _Block(32).eval()
    x = torch.randn(2, 3, 24, 24)
    torch._dynamo.reset()
    with cfg.patch(fx_graph_cache=False), torch.no_grad():
        compiled = torch.compile(model, backend="cpuboost", dynamic=dynamic)
        out = compiled(x)
        if dynamic:
            assert rel_err(model(x[:1]), compiled(x[:1])) <= TOL
    assert rel_err(model(x), out) <= TOL
    if dynamic:
        return
    opt = cpuboost.optimize(model, sample_input=x, graph_mode=True)
    with cfg.patch(fx_graph_cache=False), torch.no_grad():
        assert rel_err(model(x), opt(x)) <= TOL
    applied = " ".join(cpuboost.report_of(opt).applied("graph_mode"))
    assert "2 3x3 convolution(s) on cpuboost's Winograd kernel" in applied
