"""cpuboost::linear (the AVX2 fp32 GEMM) against float64 F.linear, and the places that use it:
FusedLinear's "avx2" backend and the compile backend's packing with GELU moved into the kernel."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cpuboost
from cpuboost.kernels import AVX2_ACTS, gemm_ops, gemm_unavailable
from cpuboost.nn import POST_OPS, FusedLinear, set_backend
from tests.conftest import rel_err, same_at_every_thread_count

needs_kernel = pytest.mark.skipif(not gemm_ops(), reason=f"kernel unavailable: {gemm_unavailable()}")
TOL = 2e-6  # fp32 accumulation over K <= 1000 (measured <= 4e-7 relative)


def _case(m, k, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5,
            torch.randn(n, generator=g) if bias else None)


def _ref(x, w, b, act="none"):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return POST_OPS[act].reference(y)


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (5, 3, 17), (6, 16, 16), (7, 300, 33),
                                     (64, 768, 96), (200, 1000, 48), (1030, 64, 40), (13, 257, 8)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(m, k, n, bias):
    """Row counts around the 6-row tile and the row blocks, K around the 256 block, N around
    the 16-wide panel (the padded tail is never written)."""
    x, w, b = _case(m, k, n, bias)
    packed = torch.ops.cpuboost.pack_linear_weight(w)
    assert packed.shape == ((n + 15) // 16, k, 16)
    out = torch.ops.cpuboost.linear(x, packed, b, n, 0)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert rel_err(_ref(x, w, b), out) <= TOL


@needs_kernel
@pytest.mark.parametrize("n", [16, 40])
def test_a_strided_bias_or_one_ending_at_the_last_output_is_read_right(n):
    """The bias is read in place (no padded copy per call): a strided view (made contiguous
    first), and a view at an offset into its storage ending at the storage's end."""
    x, w, b = _case(9, 24, n)
    storage = torch.randn(2 * n)
    strided = storage[::2]
    tail = storage[n:]
    packed = torch.ops.cpuboost.pack_linear_weight(w)
    for bias in (strided, tail):
        assert rel_err(_ref(x, w, bias), torch.ops.cpuboost.linear(x, packed, bias, n, 0)) <= TOL


@needs_kernel
@pytest.mark.parametrize("act", list(AVX2_ACTS))
def test_activations_match_torch(act):
    """Every post-op torch.nn names, applied in registers, over outputs spread across
    [-12, 12] (where the erf/tanh/exp approximations differ most) and beyond."""
    x, w, b = _case(37, 50, 70)
    b = b * 6  # a wide spread of pre-activations, some beyond +-12
    out = torch.ops.cpuboost.linear(x, torch.ops.cpuboost.pack_linear_weight(w), b, 70,
                                    AVX2_ACTS[act])
    ref = _ref(x, w, b, act)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@needs_kernel
def test_any_input_layout_and_empty_batch():
    x, w, b = _case(24, 40, 20)
    packed = torch.ops.cpuboost.pack_linear_weight(w)
    x3 = x.reshape(2, 3, 4, 40)
    assert torch.ops.cpuboost.linear(x3, packed, b, 20, 0).shape == (2, 3, 4, 20)
    strided = torch.randn(40, 24).t()  # not contiguous
    assert rel_err(_ref(strided, w, b), torch.ops.cpuboost.linear(strided, packed, b, 20, 0)) <= TOL
    assert torch.ops.cpuboost.linear(x[:0], packed, b, 20, 0).shape == (0, 20)


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    """Each output is the same sum in the same order whichever thread computes it (IPEX gave
    different results when the thread count changed)."""
    x, w, b = _case(130, 300, 200)
    packed = torch.ops.cpuboost.pack_linear_weight(w)
    assert same_at_every_thread_count(lambda: torch.ops.cpuboost.linear(x, packed, b, 200, 2))


@needs_kernel
def test_bad_arguments_say_what_is_wrong():
    x, w, b = _case(4, 8, 16)
    packed = torch.ops.cpuboost.pack_linear_weight(w)
    with pytest.raises(RuntimeError, match="input has 9 features, the weight expects 8"):
        torch.ops.cpuboost.linear(torch.randn(4, 9), packed, b, 16, 0)
    with pytest.raises(RuntimeError, match="computes in float32"):
        torch.ops.cpuboost.linear(x.double(), packed, b, 16, 0)
    with pytest.raises(RuntimeError, match="not packed by cpuboost::pack_linear_weight"):
        torch.ops.cpuboost.linear(x, w, b, 16, 0)
    with pytest.raises(RuntimeError, match="40 output features do not fit"):
        torch.ops.cpuboost.linear(x, packed, None, 40, 0)
    with pytest.raises(RuntimeError, match="bias must be float32 with 16 values"):
        torch.ops.cpuboost.linear(x, packed, torch.randn(15), 16, 0)
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.cpuboost.linear(x, packed, b, 16, 99)
    with pytest.raises(RuntimeError, match="2-d float32, bfloat16 or int8 weight"):
        torch.ops.cpuboost.pack_linear_weight(torch.randn(3, 4, 5))
    q = torch.ops.cpuboost.pack_linear_weight(torch.ones(16, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8 weights need their per-feature scales"):
        torch.ops.cpuboost.linear(x, q, b, 16, 0)
    with pytest.raises(RuntimeError, match="only int8 weights take scales"):
        torch.ops.cpuboost.linear_scaled(x, packed, torch.ones(16), b, 16, 0)
    with pytest.raises(RuntimeError, match="scale must be float32 with 16 values"):
        torch.ops.cpuboost.linear_scaled(x, q, torch.ones(12), b, 16, 0)


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 768, 2304), (5, 3, 17), (7, 300, 33),
                                     (64, 768, 96), (1030, 64, 40)], ids=lambda v: str(v))
@pytest.mark.parametrize("act", ["none", "relu"])
def test_int8_panels_scaled_per_feature_match_float64(m, k, n, act):
    """Weight-only int8: y = act(x @ q.T * scale + b), q widened exactly, scale and bias in the
    last K block (also across K blocks, and in the last panel's nvalid columns)."""
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g)
    out = torch.ops.cpuboost.linear_scaled(x, torch.ops.cpuboost.pack_linear_weight(q), scale,
                                           b, n, AVX2_ACTS[act])
    ref = _ref(x, q.double() * scale.double()[:, None], b, act)
    assert out.shape == (m, n) and rel_err(ref, out) <= TOL


@needs_kernel
def test_fused_linear_avx2_keeps_its_weight_and_state():
    """The packed panels are the only copy: .weight, state_dict, pickling, deepcopy and a move
    to another backend all see the original weight."""
    torch.manual_seed(0)
    src = nn.Linear(30, 21)
    fused = FusedLinear(src, torch.float32, "avx2").eval()
    x = torch.randn(3, 5, 30)
    with torch.no_grad():
        assert rel_err(src(x), fused(x)) <= TOL
        assert torch.equal(fused.weight, src.weight.detach()) and torch.equal(fused.bias, src.bias)
        assert set(fused.state_dict()) == {"weight", "bias"}
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        for clone in (torch.load(buf, weights_only=False), copy.deepcopy(fused)):
            assert clone.backend == "avx2" and torch.equal(clone(x), fused(x))
        fused.post_op = POST_OPS["silu"]
        assert rel_err(F.silu(src(x)), fused(x)) <= 1e-5
        set_backend(fused, "aten")
        assert rel_err(F.silu(src(x)), fused(x)) <= 1e-5


@needs_kernel
def test_optimize_puts_fp32_linears_on_the_kernel_with_activations_fused():
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 10), nn.Tanh()).eval()
    x = torch.randn(7, 20)
    opt = cpuboost.optimize(model, sample_input=x)
    assert opt[0].backend == "avx2" and opt[0].post_op.name == "gelu"
    assert opt[2].backend == "avx2" and opt[2].post_op.name == "tanh"
    with torch.no_grad():
        assert rel_err(model(x), opt(x)) <= 1e-5


@needs_kernel
def test_compiled_linears_run_the_kernel_with_activations_inside():
    """Under the backend, Inductor packs fp32 linears for cpuboost's kernel (no MKL or oneDNN
    copy) and an erf-GELU, ReLU or sigmoid after a linear runs in the kernel; SiLU (x times
    sigmoid(x): two users of the output) and a second reader of the output stay apart."""
    from torch._inductor import config as cfg

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 96), nn.Linear(96, 64)
            self.c, self.d, self.e = nn.Linear(64, 48), nn.Linear(48, 40), nn.Linear(40, 16)

        def forward(self, x):
            y = torch.relu(self.b(F.gelu(self.a(x))))
            z = self.c(y)
            z = torch.sigmoid(self.d(torch.tanh(z) + z))  # z read twice: tanh stays apart
            return F.silu(self.e(z))

    model = Net().eval()
    x = torch.randn(2, 9, 32)
    torch._dynamo.reset()
    with cfg.patch(fx_graph_cache=False), torch.no_grad():
        opt = cpuboost.optimize(model, sample_input=x, graph_mode=True)
        out = opt(x)
    applied = " ".join(cpuboost.report_of(opt).applied("graph_mode"))
    assert "0 Linear(s) on oneDNN, 5 on cpuboost's AVX2 kernel (3 with the activation fused)" \
        in applied
    with torch.no_grad():
        assert rel_err(model(x), out) <= 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_weight_need_not_be_aligned(dtype):
    """A packed weight starting off a 32-byte boundary (AOTInductor's constants can): the
    kernel once read it with aligned loads, which fault there (a package crashed in about half
    its runs)."""
    x, w, b = _case(13, 40, 20)
    packed = torch.ops.cpuboost.pack_linear_weight(w.to(dtype))
    shifted = torch.empty(packed.numel() + 1, dtype=dtype)[1:].view(packed.shape)
    shifted.copy_(packed)
    assert shifted.data_ptr() % 32 != 0 and shifted.is_contiguous()
    assert torch.equal(torch.ops.cpuboost.linear(x, shifted, b, 20, 1),
                       torch.ops.cpuboost.linear(x, packed, b, 20, 1))


def test_kernels_build_side_by_side_and_a_failed_build_says_why(tmp_path, monkeypatch):
    """_load_all runs one compiler per source at once, then loads them; a source that does not
    compile is reported with the compiler's message and the others still build."""
    import threading
    import cpuboost.kernels as kernels
    monkeypatch.setenv("CPUBOOST_CACHE", str(tmp_path))
    good = tmp_path / "good.cpp"
    good.write_text("int cpuboost_test_good() { return 1; }\n")
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    running, overlapped = [], []
    real = kernels._built

    def built(source, flags):
        running.append(source)
        overlapped.append(len(running) > 1)
        try:
            return real(source, flags)
        finally:
            running.remove(source)
    monkeypatch.setattr(kernels, "_built", built)
    gate = threading.Barrier(2, timeout=60)  # both builds start before either finishes
    monkeypatch.setattr(kernels.subprocess, "run", _after(gate, kernels.subprocess.run))
    why: list[str] = []
    assert not kernels._load_all([good, bad], ["-O0", "-fPIC", "-shared", "-w"], why)
    assert any(overlapped)
    assert len(why) == 1 and "did not build or load" in why[0] and "bad.cpp" in why[0]
    assert list((tmp_path / "kernels").glob("good-*.so"))


def _after(gate, run):
    def waiting(*args, **kwargs):
        gate.wait()
        return run(*args, **kwargs)
    return waiting
