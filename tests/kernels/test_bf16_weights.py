"""bf16 weights multiplied in float32 (cpuboost::linear on bf16 panels): what dtype=bfloat16
means on a CPU without bf16 instructions where cpuboost's AVX2 kernel runs. The reference for
every check is float64 (or stock float32) arithmetic on the weights rounded to bf16: the
products are exact, so only the float32 accumulation differs."""
import copy
import importlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cpuboost
from cpuboost.checks import bf16_weights_only
from cpuboost.errors import UnsupportedRequestError
from cpuboost.hw import detect
from cpuboost.kernels import AVX2_ACTS, gemm_ops, gemm_unavailable
from cpuboost.nn import POST_OPS, FusedLinear, set_backend
from cpuboost.nn.fused import FusedConv
from tests.conftest import rel_err

needs_kernel = pytest.mark.skipif(not gemm_ops(), reason=f"kernel unavailable: {gemm_unavailable()}")
# the mode itself: a CPU without bf16 instructions (with them, bf16 is native arithmetic)
needs_mode = pytest.mark.skipif(not bf16_weights_only(torch.bfloat16, detect()),
                                reason="bf16 is native here, or cpuboost's AVX2 kernel is not")
TOL = 2e-6  # float32 accumulation, as for float32 weights (test_gemm)
BF16 = torch.bfloat16


def _case(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5,
            torch.randn(n, generator=g))


def _rounded(model: nn.Module) -> nn.Module:
    """float32 ``model`` with every Linear's weight rounded to bf16."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(m.weight.detach().to(BF16).float())
    return out


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 768, 2304), (5, 3, 17), (7, 300, 33),
                                     (64, 768, 96), (1030, 64, 40), (13, 257, 8)],
                         ids=lambda v: str(v))
def test_bf16_panels_match_float64_on_the_rounded_weight(m, k, n):
    """Shapes around the tile, the K block and the panel edges (the bf16 panel interleaves
    features j and j + 8 in each K step; a wrong order would show in every column)."""
    x, w, b = _case(m, k, n)
    packed = torch.ops.cpuboost.pack_linear_weight(w.to(BF16))
    assert packed.dtype == BF16 and packed.shape == ((n + 15) // 16, k, 16)
    out = torch.ops.cpuboost.linear(x, packed, b, n, 0)
    ref = F.linear(x.double(), w.to(BF16).double(), b.double())
    assert out.dtype == torch.float32 and rel_err(ref, out) <= TOL
    # and far from the float32 weight's result: the rounding is real, so the test can fail
    assert rel_err(F.linear(x.double(), w.double(), b.double()), out) > 10 * TOL or k == 1


@needs_kernel
@pytest.mark.parametrize("act", list(AVX2_ACTS))
def test_bf16_panels_apply_every_activation(act):
    x, w, b = _case(37, 50, 70)
    b = b * 6
    out = torch.ops.cpuboost.linear(x, torch.ops.cpuboost.pack_linear_weight(w.to(BF16)), b, 70,
                                    AVX2_ACTS[act])
    ref = POST_OPS[act].reference(F.linear(x.double(), w.to(BF16).double(), b.double()))
    assert (out.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@needs_kernel
def test_bf16_results_do_not_depend_on_the_thread_count():
    x, w, b = _case(50, 300, 70)
    packed = torch.ops.cpuboost.pack_linear_weight(w.to(BF16))
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(torch.ops.cpuboost.linear(x, packed, b, 70, 0))
        outs.append(torch.ops.cpuboost.linear(x[:1], packed, b, 70, 0))  # panels split
    assert all(torch.equal(o, outs[i % 2]) for i, o in enumerate(outs))


@needs_kernel
def test_fused_linear_holds_bf16_and_shows_the_rounded_weight():
    """Half the bytes; .weight / state_dict are the weight as held (rounded, in the original
    dtype); pickle and deepcopy keep it; aten (used by export) computes the same."""
    torch.manual_seed(0)
    src = nn.Linear(30, 21)
    fused = FusedLinear(src, torch.float32, "avx2", weight_dtype=BF16).eval()
    full = FusedLinear(src, torch.float32, "avx2").eval()
    x = torch.randn(3, 5, 30)
    rounded = src.weight.detach().to(BF16).float()
    with torch.no_grad():
        assert torch.equal(fused.weight, rounded) and fused.weight.dtype == torch.float32
        assert torch.equal(fused.state_dict()["weight"], rounded)
        assert fused.weight_bytes() - 21 * 4 == (full.weight_bytes() - 21 * 4) // 2
        ref = F.linear(x, rounded, src.bias)
        assert rel_err(ref, fused(x)) <= TOL and rel_err(ref, fused.reference_forward(x)) <= TOL
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        for clone in (torch.load(buf, weights_only=False), copy.deepcopy(fused)):
            assert clone.weight_dtype == BF16 and torch.equal(clone(x), fused(x))
        set_backend(fused, "aten")  # what export does: dense float32 weights for Inductor
        assert fused._w.dtype == torch.float32 and rel_err(ref, fused(x)) <= TOL
        set_backend(fused, "avx2")
        assert fused._w.dtype == BF16 and rel_err(ref, fused(x)) <= TOL
    assert "weights=torch.bfloat16" in repr(fused)


@needs_kernel
def test_unpickled_where_the_kernel_cannot_run_falls_back_to_float32(monkeypatch):
    torch.manual_seed(0)
    src = nn.Linear(30, 21)
    fused = FusedLinear(src, torch.float32, "avx2", weight_dtype=BF16).eval()
    data = io.BytesIO()
    torch.save(fused, data)
    data.seek(0)
    monkeypatch.setattr(importlib.import_module("cpuboost.kernels"), "gemm_ops", lambda: False)
    loaded = torch.load(data, weights_only=False)
    x = torch.randn(4, 30)
    assert loaded.backend == "aten" and loaded._w.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(F.linear(x, src.weight.to(BF16).float(), src.bias), loaded(x)) <= TOL


def test_bf16_weights_need_the_avx2_kernel():
    with pytest.raises(UnsupportedRequestError, match="only cpuboost's AVX2 kernel"):
        FusedLinear(nn.Linear(8, 4), torch.float32, "aten", weight_dtype=BF16)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 16, 64), nn.Linear(64, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean(dim=2).flatten(1)
        return self.fc2(F.gelu(self.fc1(y)))


@needs_mode
def test_optimize_bf16_holds_linear_weights_in_bf16_and_computes_in_float32():
    """No emulated-bf16 warning; linears on the kernel with bf16 weights, the convolution in
    float32; float32 outputs equal to float32 arithmetic on the rounded weights."""
    torch.manual_seed(0)
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cpuboost.optimize(model, dtype=BF16, sample_input=x)
    report = cpuboost.report_of(opt)
    assert report.dtype == "bfloat16 weights, float32 arithmetic" and report.numerics.passed
    assert not report.warnings
    assert all(m.weight_dtype == BF16 and m.backend == "avx2" for m in (opt.fc1, opt.fc2))
    assert isinstance(opt.conv, FusedConv) and opt.conv.compute_dtype == torch.float32
    assert any("fc1: FusedLinear (avx2, torch.bfloat16 weights, torch.float32)" in a
               for a in report.applied("prepack"))
    assert report.weight_bytes_after < report.weight_bytes_before * 0.6
    with torch.no_grad():
        out = opt(x)
        assert out.dtype == torch.float32
        assert rel_err(_rounded(model)(x), out) <= 1e-5
        assert rel_err(model(x), out) > 1e-4  # the weights are rounded: not a float32 copy
    state = opt.state_dict()
    assert state["fc1.weight"].dtype == torch.float32
    assert torch.equal(state["fc1.weight"], model.fc1.weight.detach().to(BF16).float())


@needs_mode
def test_graph_mode_bf16_packs_bf16_weights_for_the_kernel():
    from torch._inductor import config as cfg
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 16)).eval()
    x = torch.randn(3, 32)
    torch._dynamo.reset()
    with cfg.patch(fx_graph_cache=False), torch.no_grad():
        opt = cpuboost.optimize(model, dtype=BF16, sample_input=x, graph_mode=True)
        out = opt(x)
        linear_pass = opt.forward.linear_pass
    report = cpuboost.report_of(opt)
    assert report.dtype == "bfloat16 weights, float32 arithmetic"
    assert "2 on cpuboost's AVX2 kernel" in " ".join(report.applied("graph_mode"))
    assert linear_pass.weight_dtype == BF16
    with torch.no_grad():
        assert out.dtype == torch.float32 and rel_err(_rounded(model)(x), out) <= 1e-5
        assert rel_err(model(x), out) > 1e-4


@needs_mode
def test_export_bf16_packages_bf16_weights_for_float32_arithmetic(tmp_path):
    """export(dtype=bfloat16) of a model as written (not optimized): no emulated-bf16 warning;
    the package's linears run the kernel on bf16 weights, its outputs are float32 and equal to
    float32 arithmetic on the rounded weights; the metadata says so."""
    torch.manual_seed(0)
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = cpuboost.export(model, (x,), tmp_path / "bf16w.cbpk", dtype=BF16)
    loaded = cpuboost.load(path)
    assert (loaded.metadata["dtype"], loaded.metadata["arithmetic"]) == ("bfloat16", "float32")
    assert loaded.metadata["cpuboost_ops"] == ["cpuboost::linear"]
    assert "bfloat16 weights, float32 arithmetic" in repr(loaded)
    x3 = torch.randn(3, 3, 16, 16)
    out = loaded(x3)
    with torch.no_grad():
        assert out.dtype == torch.float32 and rel_err(_rounded(model)(x3), out) <= 1e-5
        assert rel_err(model(x3), out) > 1e-4  # the weights are rounded: not a float32 copy


@needs_mode
def test_llm_optimize_bf16_keeps_float32_activations():
    from tests.llm.conftest import prompts, tiny_model
    fast = cpuboost.llm.optimize(tiny_model("gpt2"))
    report = cpuboost.report_of(fast)
    assert report.dtype == "bfloat16 weights, float32 arithmetic" and not report.warnings
    linears = [m for m in fast.modules() if isinstance(m, FusedLinear)]
    assert linears and all(m.weight_dtype == BF16 and m.backend == "avx2" for m in linears)
    assert fast.transformer.wte.weight.dtype == torch.float32
    ids, mask = prompts()
    with torch.no_grad():
        assert fast(input_ids=ids, attention_mask=mask).logits.dtype == torch.float32


@needs_mode
def test_llm_woq_int8_takes_float32_activations_on_the_kernel(tmp_path):
    """woq_int8 where bf16 means bf16 weights: the int8 layers run cpuboost's kernel with
    float32 activations (aten's int8 kernel would need emulated bf16 ones to be fast), no
    emulation warning, and a saved model loads onto the same kernel with equal logits."""
    from cpuboost.nn.woq import WoqLinear
    from tests.llm.conftest import prompts, tiny_model
    fast = cpuboost.llm.optimize(tiny_model("gpt2"), quantization="woq_int8")
    report = cpuboost.report_of(fast)
    assert not report.warnings
    assert any("woq_int8 on cpuboost's AVX2 kernel (float32 activations)" in a
               for a in report.applied("linears"))
    woq = [m for m in fast.modules() if isinstance(m, WoqLinear)]
    assert woq and all(m.on_avx2 for m in woq)
    assert any("the int8 layers take float32 activations" in n
               for n in report.pass_named("structure").notes)
    ids, mask = prompts()
    with torch.no_grad():
        logits = fast(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.float32
    cpuboost.llm.save_quantized(fast, tmp_path / "m")
    loaded = cpuboost.llm.load_quantized(tmp_path / "m")
    assert all(m.on_avx2 for m in loaded.modules() if isinstance(m, WoqLinear))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
