"""WoqLinear: torch's int8/int4 weight-only kernels against the module's own fp32 reference,
and the quantization error against the float weight, by SQNR in dB."""
import platform

import pytest
import torch

from cpuboost.kernels import gemm_ops, gemm_unavailable
from cpuboost.nn.woq import (WoqLinear, pack_nibbles, quantize_int4, quantize_int8,
                             unpack_nibbles, why_not_woq)


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.float(), got.float()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean().clamp(min=1e-30)))


CASES = [(8, 0, True), (4, 32, False), (4, 64, True), (4, 128, False)]


@pytest.mark.parametrize("bits,group,symmetric", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40, 160])  # 40 (int8), 160 (int4): dequantize + GEMM
def test_kernel_matches_reference(bits, group, symmetric, dtype, rows):
    torch.manual_seed(0)
    w, b = torch.randn(128, 256), torch.randn(128)
    m = WoqLinear.from_float(w, b, bits, group, symmetric, dtype)
    x = torch.randn(2, rows, 256)
    got = m(x.to(dtype))
    assert got.shape == (2, rows, 128) and got.dtype == dtype
    # fp32 activations: only summation order differs; bf16: activations rounded to bf16
    assert sqnr(m.reference_forward(x), got) > (90 if dtype == torch.float32 else 40)


@pytest.mark.parametrize("bits,group,symmetric,floor", [(8, 0, True, 38), (4, 32, False, 19),
                                                        (4, 128, True, 15)])
def test_quantization_error_vs_float_weight(bits, group, symmetric, floor):
    torch.manual_seed(1)
    w = torch.randn(128, 512)
    m = WoqLinear.from_float(w, None, bits, group, symmetric, torch.float32)
    assert sqnr(w, m.dequantized()) > floor


@pytest.mark.parametrize("bits,group,symmetric", CASES)
def test_state_dict_round_trip_is_exact(bits, group, symmetric):
    torch.manual_seed(2)
    m = WoqLinear.from_float(torch.randn(64, 128), torch.randn(64), bits, group, symmetric,
                             torch.bfloat16)
    state = m.state_dict()
    assert state["qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    fresh = WoqLinear(128, 64, bits, group, symmetric, True, torch.bfloat16)
    fresh.load_state_dict(state)
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh.dequantized(), m.dequantized())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 layouts")
def test_int4_layout_has_a_closed_form_on_x86():
    """AVX-512 builds pack 64 channels a block, AVX2 ones 32: both read without the learned
    order's gather (3x faster here), so prefill and dequantized() take the fast path."""
    from cpuboost.nn.woq import _blocked_width
    assert _blocked_width() in (32, 64)


@pytest.mark.parametrize("rows", [48, 192])  # 48: read back by the learned order only
def test_int4_codes_survive_the_kernel_pack(rows):
    torch.manual_seed(3)
    q, scale, zero = quantize_int4(torch.randn(rows, 256), 64, symmetric=False)
    m = WoqLinear(256, rows, 4, 64, False, False, torch.float32)
    m._set_int4(q, scale, zero)
    assert torch.equal(m._int4_codes(), q)
    assert torch.equal(m._int4_codes_gathered(), q)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_wrong_shapes_are_refused_with_the_reason():
    assert "multiple of 16" in why_not_woq(64, 100, 8, 0)
    assert "out_features 50" in why_not_woq(50, 128, 4, 32)
    assert "group_size 128" in why_not_woq(64, 96, 4, 128)
    assert why_not_woq(50, 128, 8, 0) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        WoqLinear(100, 64, 8)


def test_load_with_wrong_shape_reports_and_keeps_weights():
    m = WoqLinear.from_float(torch.randn(32, 64), None, 8, compute_dtype=torch.float32)
    before = m.dequantized().clone()
    bad = {"qweight": torch.zeros(16, 64, dtype=torch.int8), "scales": torch.ones(16)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        m.load_state_dict(bad)
    assert torch.equal(m.dequantized(), before)


def test_cast_or_move_is_refused():
    m = WoqLinear.from_float(torch.randn(32, 64), None, 8, compute_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        m.half()


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_inputs_and_weights(bits, group, dtype):
    """A view starting mid-buffer (a sliced position, a tensor inside a loaded file) crashed
    the bf16 kernels before inputs and weights were realigned."""
    torch.manual_seed(4)
    m = WoqLinear.from_float(torch.randn(64, 96), None, bits, group, True, dtype)
    state = {k: torch.cat([torch.zeros(1, dtype=v.dtype), v.flatten()])[1:].view(v.shape)
             for k, v in m.state_dict().items()}  # every tensor off its allocation's start
    m.load_state_dict(state)
    big = torch.randn(8 * 96 + 8).to(dtype)
    for offset in range(1, 8):
        x = big[offset:offset + 3 * 96].view(3, 96)
        assert sqnr(m.reference_forward(x), m(x)) > (90 if dtype == torch.float32 else 40)


@pytest.mark.skipif(not gemm_ops(), reason=f"kernel unavailable: {gemm_unavailable()}")
def test_int8_with_float32_activations_runs_the_avx2_kernel(monkeypatch):
    """Where cpuboost's AVX2 kernel runs, an int8 layer with float32 activations holds its
    weight as the kernel's int8 panels (the only copy) and runs it: same results as the
    reference, the portable state is the int8 weight, and copies, reloads and unpickling where
    the kernel cannot run all compute the same."""
    import copy
    import importlib
    import io
    torch.manual_seed(5)
    w, b = torch.randn(40, 96), torch.randn(40)  # 40: the last panel is partial
    m = WoqLinear.from_float(w, b, 8, 0, True, torch.float32)
    assert m.on_avx2 and m._q.shape == (3, 96, 16) and m._q.dtype == torch.int8
    assert torch.equal(m.state_dict()["qweight"], quantize_int8(w)[0])
    x = torch.randn(2, 3, 96)
    out = m(x)
    assert out.dtype == torch.float32 and sqnr(m.reference_forward(x), out) > 90
    fresh = WoqLinear(96, 40, 8, 0, True, True, torch.float32)
    fresh.load_state_dict(m.state_dict())
    assert fresh.on_avx2 and torch.equal(fresh(x), out)
    assert torch.equal(copy.deepcopy(m)(x), out)
    buf = io.BytesIO()
    torch.save(m, buf)
    monkeypatch.setattr(importlib.import_module("cpuboost.nn.woq"), "gemm_ops", lambda: False)
    buf.seek(0)
    elsewhere = torch.load(buf, weights_only=False)
    assert not elsewhere.on_avx2 and elsewhere._q.shape == (40, 96)
    assert sqnr(out, elsewhere(x)) > 90  # aten's kernel, same weights


@pytest.mark.parametrize("bits, group", [(8, 0), (4, 32)])
def test_weight_and_bias_read_as_a_linear_s(bits, group):
    """Code that reads a layer's .weight (Mamba: lm_head.weight.dtype) gets the weight the
    kernel multiplies by."""
    torch.manual_seed(0)
    m = WoqLinear.from_float(torch.randn(64, 128), torch.randn(64), bits, group, True,
                             torch.float32 if bits == 8 else torch.bfloat16)
    x = torch.randn(3, 128).to(m.compute_dtype)
    assert m.weight.dtype == m.compute_dtype and m.weight.shape == (64, 128)
    torch.testing.assert_close(torch.nn.functional.linear(x, m.weight, m.bias).float(),
                               m(x).float(), rtol=0.05, atol=0.05)
