"""cpuboost::attention against torch's SDPA (fp32 math as the reference), and the graph pass
that puts it in bf16 and int8 graphs only."""
import pytest
import torch
import torch.nn.functional as F

import cpuboost
from cpuboost.kernels import attention_op, unavailable
from tests.conftest import BF16_RTOL, rel_err

needs_kernel = pytest.mark.skipif(attention_op() is None,
                                  reason=f"kernel unavailable: {unavailable()}")
TOL = 1e-2  # bf16 inputs and probabilities, fp32 accumulation (measured ~3.5e-3)


def _qkv(b, h, lq, lk, d, strided, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(n):  # strided: the view of a [B, L, H*D] projection, as attention reads it
        t = torch.randn(b, n, h, d, generator=g) if strided else torch.randn(b, h, n, d, generator=g)
        return (t.transpose(1, 2) if strided else t).to(dtype)
    return make(lq), make(lk), make(lk)


def _rel(ref, out):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _reference(q, k, v, mask, scale):
    q, k, v = q.float(), k.float(), v.float()
    mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("shape", [(1, 12, 17, 17, 64), (2, 4, 45, 45, 32), (1, 2, 130, 130, 128),
                                   (3, 2, 1, 1, 64), (1, 3, 5, 33, 64), (2, 12, 128, 128, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", ["none", "keys", "full", "bool"])
@needs_kernel
def test_matches_sdpa(shape, dtype, mask):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, strided=d == 64, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    m = {"none": None,
         "keys": torch.zeros(b, 1, 1, lk).index_fill_(3, torch.tensor([lk - 1]), -1e9),  # padding
         "full": torch.randn(b, 1, lq, lk, generator=g).to(dtype),
         "bool": torch.rand(b, h, lq, lk, generator=g) > 0.3}[mask]
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True  # no row fully masked here (see the next test)
    out = attention_op()(q, k, v, m, 0.2)
    assert out.shape == (b, h, lq, d) and out.dtype == dtype
    assert out.stride() == torch.empty(b, lq, h, d).transpose(1, 2).stride()  # as flash's
    assert _rel(_reference(q, k, v, m, 0.2), out) < TOL


@needs_kernel
def test_a_fully_masked_row_is_zero_and_the_thread_count_changes_nothing():
    q, k, v = _qkv(1, 2, 6, 6, 64, strided=True, dtype=torch.float32)
    m = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    m[0, 0, 2] = False
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_op()(q, k, v, m, 0.125)
        torch.set_num_threads(2)
        two = attention_op()(q, k, v, m, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.isfinite(one).all()
    assert torch.equal(one[0, :, 2], torch.zeros(2, 64))


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v: (q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous(), None), "head dim"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1], None), "do not match"),
    (lambda q, k, v: (q, k, v.bfloat16(), None), "one dtype"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 1, 1, 7)), "does not broadcast"),
])
@needs_kernel
def test_bad_input_says_what_is_wrong(bad, message):
    q, k, v = _qkv(1, 2, 5, 5, 64, strided=False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=message):
        attention_op()(*bad(q, k, v), 0.125)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=256,
                                  max_position_embeddings=64)
    ids = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # padding: the mask reaches the kernel
    return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}


def _attention_note(model) -> str:
    return next(n for n in cpuboost.report_of(model).applied("graph_mode") if "attention" in n)


@pytest.mark.parametrize("dtype, used", [(torch.bfloat16, 2), (None, 0)], ids=["bf16", "fp32"])
@needs_kernel
def test_graph_mode_uses_it_for_bf16_not_fp32(dtype, used):
    torch._dynamo.reset()
    model, inputs = _tiny_bert()
    opt = cpuboost.optimize(model, dtype=dtype, graph_mode=True, sample_input=inputs)
    assert f"{used} attention(s) on cpuboost's bf16 kernel" in _attention_note(opt)
    with torch.no_grad():
        ref, out = model(**inputs).last_hidden_state, opt(**inputs).last_hidden_state
    assert rel_err(ref, out.float()) <= (BF16_RTOL if dtype else 1e-4)


@needs_kernel
def test_int8_graphs_use_it():
    torch._dynamo.reset()
    model, inputs = _tiny_bert()
    calib = [inputs]
    q = cpuboost.quantize(model, calib, example_inputs=inputs, graph_mode=True)
    with torch.no_grad():
        ref, out = model(**inputs).last_hidden_state, q(**inputs).last_hidden_state
    assert "2 attention(s) on cpuboost's bf16 kernel" in _attention_note(q)
    cos = F.cosine_similarity(ref.flatten(), out.float().flatten(), 0)
    assert cos > 0.99


@pytest.mark.slow
def test_the_report_says_why_the_kernel_was_not_used(monkeypatch):
    """Where the kernel cannot run (no AVX512-BF16, no compiler), graphs keep torch's attention
    and the report gives the reason instead of a bare count of 0."""
    import cpuboost.compile.attention_pass as attention_pass
    import cpuboost.kernels as kernels
    monkeypatch.setattr(attention_pass, "attention_op", lambda: None)
    monkeypatch.setattr(attention_pass, "_f32_op", lambda: None)  # nor the AVX2 fp32 one
    monkeypatch.setattr(kernels, "unavailable", lambda: "the CPU has no AVX512-BF16")
    torch._dynamo.reset()
    model, inputs = _tiny_bert()
    from torch._inductor import config as cfg
    with cfg.patch(fx_graph_cache=False):  # the pass must run: a cached graph skips it
        q = cpuboost.quantize(model, [inputs], example_inputs=inputs, graph_mode=True)
    assert "0 attention(s) on cpuboost's bf16 kernel" in _attention_note(q)
    skipped = [why for _, why in cpuboost.report_of(q).pass_named("graph_mode").skipped]
    assert "2 attention(s) kept on torch's kernel: the CPU has no AVX512-BF16" in skipped
    with torch.no_grad():
        ref, out = model(**inputs).last_hidden_state, q(**inputs).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
