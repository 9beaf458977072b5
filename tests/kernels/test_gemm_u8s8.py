"""cpuboost::linear_u8s8 (the AVX2 int8 x int8 GEMM) and cpuboost::quantize_u8 against exact
integer and float64 references, and Int8Linear running on them (CPUs with AVX2, no VNNI)."""
import copy
import io

import pytest
import torch

from cpuboost.kernels import AVX2_ACTS, gemm_unavailable, unpack_u8s8
from cpuboost.nn import POST_OPS
from cpuboost.nn.int8 import Int8Conv, Int8Linear, avx2_kernels, dynamic_qparams, quantize_weight
from tests.conftest import rel_err, same_at_every_thread_count

needs_kernel = pytest.mark.skipif(not avx2_kernels(), reason="the int8 AVX2 kernel runs only on "
                                  f"x86 without VNNI or AVX-512 ({gemm_unavailable()})")
ops = torch.ops.cpuboost


def _ints(m, k, n, seed=0, wmax=64):
    """uint8 input, int8 weight bounded so that no int16 pair sum saturates (|w| < 64)."""
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    qw = torch.randint(-wmax, wmax, (n, k), generator=g, dtype=torch.int8)
    return qx, qw, torch.rand(n, generator=g) * 0.02 + 1e-3, torch.randn(n, generator=g)


def _run(x, qw, w_scale, bias, act=0, x_scale=0.05, x_zp=7, qmax=255, out=(0.0, 0)):
    return ops.linear_u8s8(x, ops.pack_u8s8_weight(qw), w_scale, qw.sum(1, dtype=torch.int32),
                           bias, qw.shape[0], act, x_scale, x_zp, qmax, *out)


def _exact(qx, qw, w_scale, bias, x_scale, x_zp):
    """float64: the integer sum is exact there (|sum| < 2^53)."""
    acc = (qx.double() - x_zp) @ qw.double().T
    return acc * (x_scale * w_scale.double()) + (0 if bias is None else bias.double())


def _quantize_ref(x, scale, zp, qmax=255):
    return x.mul(1.0 / scale).round_().add_(zp).clamp_(0, qmax).to(torch.uint8)


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (3, 5, 17), (4, 4, 16), (9, 1023, 33),
                                     (130, 1030, 40), (5, 2050, 16), (200, 64, 7)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_integer_sums_are_exact(m, k, n, bias):
    """Rows around the 4-row tile and 192-row blocks, K not a multiple of 4 and across the 1024
    block, N around the 16-wide panel: only the final float scaling rounds."""
    qx, qw, ws, b = _ints(m, k, n, seed=m + k + n)
    b = b if bias else None
    out = _run(qx, qw, ws, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    # float32 rounding of the int32 sum, the combined scale and the bias add: a few ulp
    assert rel_err(_exact(qx, qw, ws, b, 0.05, 7), out) < 1e-6


@needs_kernel
def test_extreme_values_of_pair_bounded_weights_do_not_saturate():
    """255s against neighbouring weights summing to 128 or -128 in pairs: the largest int16 pair
    sums vpmaddubsw can hold exactly (what pair-bounded quantization guarantees)."""
    k = 64
    qw = torch.tensor([[64, 64] * (k // 2), [-64, -64] * (k // 2), [127, 1] * (k // 2),
                       [-128, 0] * (k // 2)], dtype=torch.int8)
    qx = torch.full((3, k), 255, dtype=torch.uint8)
    out = _run(qx, qw, torch.ones(4), None, x_scale=1.0, x_zp=0)
    assert torch.equal(out.double(), _exact(qx, qw, torch.ones(4), None, 1.0, 0))


@needs_kernel
def test_quantize_u8_is_torchs_formula_in_any_layout():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 7, generator=g) * 3
    x[0, 0, 0, :4] = torch.tensor([0.25, 0.75, -0.25, 1e9])  # ties at scale 0.5, and a clamp
    for t in (x, x.to(memory_format=torch.channels_last), x.transpose(1, 3), x[:, :, 1:4]):
        q = ops.quantize_u8(t, 0.5, 100, 255)
        assert q.dtype == torch.uint8 and torch.equal(q, _quantize_ref(t, 0.5, 100))
    for dense in (x.to(memory_format=torch.channels_last), x.transpose(1, 3)):
        assert ops.quantize_u8(dense, 0.5, 100, 255).stride() == dense.stride()
    assert torch.equal(ops.quantize_u8(x, 0.01, 64, 127), _quantize_ref(x, 0.01, 64, 127))


@needs_kernel
def test_a_float_input_is_quantized_inside_as_torch_would():
    """Static (given qparams) and dynamic (x_scale 0: the range measured inside, as
    dynamic_qparams does): the same result as quantizing first, bit for bit."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 75, generator=g) * 4 + 1
    _, qw, ws, b = _ints(37, 75, 20)
    static = _run(x, qw, ws, b, x_scale=0.07, x_zp=90)
    assert torch.equal(static, _run(_quantize_ref(x, 0.07, 90), qw, ws, b, x_scale=0.07, x_zp=90))
    scale, zp = dynamic_qparams(x, 255)
    dynamic = _run(x, qw, ws, b, x_scale=0.0, x_zp=0)
    assert torch.equal(dynamic, _run(_quantize_ref(x, scale, zp), qw, ws, b, x_scale=scale,
                                     x_zp=zp))
    x[3, 4] = float("nan")
    with pytest.raises(RuntimeError, match="inf or NaN"):
        _run(x, qw, ws, b, x_scale=0.0, x_zp=0)


@needs_kernel
@pytest.mark.parametrize("act", list(AVX2_ACTS))
def test_activations_and_uint8_output(act):
    """Each activation in registers against float64; the uint8 output (for the next int8 layer)
    is the float output quantized by torch's formula."""
    qx, qw, ws, b = _ints(23, 40, 35, seed=3)
    b = b * 6
    out = _run(qx, qw, ws, b, AVX2_ACTS[act])
    ref = POST_OPS[act].reference(_exact(qx, qw, ws, b, 0.05, 7))
    assert (out.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    q = _run(qx, qw, ws, b, AVX2_ACTS[act], out=(0.03, 120))
    assert q.dtype == torch.uint8 and torch.equal(q, _quantize_ref(out, 0.03, 120))


@needs_kernel
def test_layouts_empty_batch_and_thread_count():
    qx, qw, ws, b = _ints(130, 300, 200, seed=4)
    ref = _run(qx, qw, ws, b)
    assert _run(qx.reshape(2, 5, 13, 300), qw, ws, b).shape == (2, 5, 13, 200)
    assert torch.equal(_run(qx.t().contiguous().t(), qw, ws, b), ref)
    assert _run(qx[:0], qw, ws, b).shape == (0, 200)
    assert same_at_every_thread_count(
        lambda: _run(qx.float() * 0.1, qw, ws, b, 2, x_scale=0.0, x_zp=0))


@needs_kernel
def test_pack_round_trip_and_bad_arguments():
    qx, qw, ws, b = _ints(4, 10, 20)
    packed = ops.pack_u8s8_weight(qw)
    assert packed.shape == (2, 3, 16, 4) and torch.equal(unpack_u8s8(packed, 20, 10), qw)
    cs = qw.sum(1, dtype=torch.int32)

    def call(x=qx, p=packed, s=ws, c=cs, bias=b, n=20, act=0, zp=7, qmax=255, out=(0.0, 0)):
        return ops.linear_u8s8(x, p, s, c, bias, n, act, 0.05, zp, qmax, *out)
    with pytest.raises(RuntimeError, match="input has 13 features, the weight expects 9 to 12"):
        call(x=torch.zeros(4, 13, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="float32 or uint8 input"):
        call(x=qx.double())
    with pytest.raises(RuntimeError, match="not packed by cpuboost::pack_u8s8_weight"):
        call(p=qw)
    with pytest.raises(RuntimeError, match="40 output features do not fit"):
        call(n=40)
    with pytest.raises(RuntimeError, match="one per output feature"):
        call(c=cs.float())
    with pytest.raises(RuntimeError, match="bias must be float32 with 20 values"):
        call(bias=torch.ones(3))
    with pytest.raises(RuntimeError, match="unknown activation"):
        call(act=99)
    with pytest.raises(RuntimeError, match="input zero point 300 outside 0..255"):
        call(zp=300)
    with pytest.raises(RuntimeError, match="output zero point -1"):
        call(out=(0.1, -1))
    with pytest.raises(RuntimeError, match="2-d int8 weight"):
        ops.pack_u8s8_weight(qw.float())
    with pytest.raises(RuntimeError, match="must be positive"):
        ops.quantize_u8(torch.ones(3), 0.0, 0, 255)


@needs_kernel
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("post_op", ["none", "gelu"])
def test_int8_linear_runs_the_kernel_and_matches_its_reference(dynamic, post_op):
    """The module holds only the kernel's packing, matches its plain-PyTorch oracle and
    survives deepcopy, pickling and a round trip through the compile form."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(48, 70, generator=g) / 8, torch.randn(48, generator=g)
    x = torch.randn(3, 11, 70, generator=g)
    layer = Int8Linear(w, b, None if dynamic else (0.03, 128), post_op=POST_OPS[post_op])
    assert layer.packed and layer._w.dim() == 4
    assert torch.equal(layer.qweight, quantize_weight(w)[0])
    with torch.no_grad():
        y = layer(x)
        ref = layer.reference_forward(x)
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
        for other in (copy.deepcopy(layer), _pickled(layer)):
            assert other._w.dim() == 4 and torch.equal(other(x), y)
        layer.for_compile()
        assert not layer.packed and torch.equal(layer.reference_forward(x), ref)
        layer.for_eager()
        assert torch.equal(layer(x), y)
        xb = x.bfloat16()  # a bf16 input: a bf16 output
        assert torch.equal(layer(xb), layer(xb.float()).bfloat16())


def _pickled(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@needs_kernel
def test_handing_uint8_to_the_next_layer_matches_the_float_route():
    g = torch.Generator().manual_seed(6)
    first = Int8Linear(torch.randn(32, 24, generator=g) / 5, None, (0.02, 128))
    second = Int8Linear(torch.randn(8, 32, generator=g) / 5, None, (0.05, 100))
    x = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        between = first(x)
        floats = second(between)
        first.out_q = (second.x_scale, second.x_zp)
        handed = first(x)
        assert handed.dtype == torch.uint8
        assert torch.equal(handed, _quantize_ref(between, 0.05, 100))
        assert torch.equal(second(handed), floats)


@needs_kernel
@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_int8_conv_is_a_matrix_product_on_the_kernel(stride):
    """A 1x1 Conv2d (a strided one subsamples first on these CPUs) holds only the kernel's
    packing, reads NCHW or channels-last float or uint8 input, writes channels-last, and matches
    its plain-PyTorch oracle; a 3x3 conv stays on oneDNN."""
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(24, 20, 1, 1, generator=g) / 4, torch.randn(24, generator=g)
    conv = Int8Conv(w, b, (0.03, 100), (stride, stride), (0, 0), (1, 1), 1,
                    post_op=POST_OPS["relu"])
    assert conv.packed and conv._u8s8 and torch.equal(conv.qweight, quantize_weight(w)[0])
    x = torch.randn(2, 20, 9, 7, generator=g)
    with torch.no_grad():
        y = conv(x)
        ref = conv.reference_forward(x)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
        assert torch.equal(conv(x.contiguous(memory_format=torch.channels_last)), y)
        qx = _quantize_ref(x, 0.03, 100)
        assert torch.equal(conv(qx), y)  # uint8 handed over by a previous layer
        assert torch.equal(_pickled(conv)(x), y)
        conv.for_compile()
        assert not conv.packed and conv.qweight.shape == (24, 20, 1, 1)
        conv.for_eager()
        assert conv._u8s8 and torch.equal(conv(x), y)
    wide = Int8Conv(torch.randn(8, 20, 3, 3, generator=g), None, (0.03, 100), (1, 1), (1, 1),
                    (1, 1), 1)
    assert wide.packed and not wide._u8s8


class _Block(torch.nn.Module):
    """Linear -> GELU -> Linear, plus a residual: a transformer MLP."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 96), torch.nn.Linear(96, 32)
        self.act = torch.nn.GELU()

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


@needs_kernel
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_graph_mode_keeps_int8_linears_on_the_kernel(dynamic):
    """Compiled, the int8 linears stay packed for cpuboost's kernel (an opaque op in the graph,
    not Inductor's oneDNN int8 kernel), the report says so, and the outputs are eager int8's."""
    import cpuboost
    from cpuboost.verify import sqnr_db
    torch.manual_seed(0)
    model = _Block().eval()
    calib = [torch.randn(2, 10, 32) for _ in range(3)]
    config = cpuboost.DynamicInt8Config() if dynamic else None
    kw = dict(config=config, example_inputs=calib[0]) if dynamic else {}
    eager = cpuboost.quantize(model, None if dynamic else calib, **kw)
    compiled = cpuboost.quantize(model, None if dynamic else calib, graph_mode=True, **kw)
    assert compiled.up.traced_as_op and compiled.down.traced_as_op and compiled.up.packed
    note = cpuboost.report_of(compiled).applied("int8_linears_on_cpuboost_kernel")
    assert note and note[0].startswith("2 int8 linears stay on cpuboost's AVX2 int8 kernel")
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert sqnr_db(eager(x), compiled(x)) > 60


@needs_kernel
def test_more_input_features_than_int32_sums_allow_stay_on_onednn(monkeypatch):
    """The kernel refuses K > 65536 (255 x 128 per product could overflow int32 beyond); a
    layer that wide keeps oneDNN's kernel (the limit lowered here to keep the test small)."""
    qx, qw, ws, b = _ints(2, 8, 16)
    monkeypatch.setattr(Int8Linear, "MAX_IN", 7)
    layer = Int8Linear(qw.float() / 64, b, (0.05, 7))
    assert layer.packed and not layer._u8s8
    with torch.no_grad():
        x = torch.randn(2, 8)
        ref = layer.reference_forward(x)
        assert (layer(x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    wide = torch.zeros(2, 65537, dtype=torch.uint8)
    qw = torch.zeros(16, 65537, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="65537 input features could overflow"):
        _run(wide, qw, ws, b)
