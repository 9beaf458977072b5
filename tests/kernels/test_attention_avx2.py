"""cpuboost::attention_f32 (fp32 attention on AVX2 CPUs) against float64 SDPA, and the graph
pass that uses it in fp32 and int8 graphs."""
import pytest
import torch
import torch.nn.functional as F

import cpuboost
from cpuboost.kernels import gemm_ops, gemm_unavailable
from tests.conftest import rel_err, same_at_every_thread_count
from tests.kernels.test_attention import _attention_note, _tiny_bert

needs_kernel = pytest.mark.skipif(not gemm_ops(), reason=f"kernel unavailable: {gemm_unavailable()}")
TOL = 2e-6  # fp32 sums over <= 200 keys and head dims <= 128 (measured <= 7e-7)


def _qkv(b, h, lq, lk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))


def _ref(q, k, v, mask, scale):
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          scale=scale)


@needs_kernel
@pytest.mark.parametrize("b, h, lq, lk, d", [(1, 12, 128, 128, 64), (2, 3, 17, 17, 64),
                                             (1, 2, 5, 33, 32), (1, 4, 100, 100, 128),
                                             (2, 2, 7, 9, 24), (1, 1, 60, 200, 80)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("mask", ["none", "padding", "bool", "full"])
def test_matches_float64_reference(b, h, lq, lk, d, mask):
    """Query rows around the 48-row block and the 6-row tile, keys and head dims around the
    16-wide panel; masks additive and broadcast (padding), boolean per head, or one per query."""
    q, k, v = _qkv(b, h, lq, lk, d)
    g = torch.Generator().manual_seed(1)
    m = {"none": None, "padding": torch.randn(b, 1, 1, lk, generator=g),
         "bool": torch.rand(b, h, lq, lk, generator=g) > 0.3,
         "full": torch.randn(1, 1, lq, lk, generator=g)}[mask]
    if mask == "bool":
        m[..., 0] = True  # no row entirely masked (torch gives NaN there; see below)
    out = torch.ops.cpuboost.attention_f32(q, k, v, m, 0.3)
    assert out.shape == (b, h, lq, d) and rel_err(_ref(q, k, v, m, 0.3), out) <= TOL


@needs_kernel
def test_strided_inputs_and_a_row_with_every_key_masked():
    """[B, L, H, D] seen as [B, H, L, D] (how models hand it over) is read in place; a query
    whose every key is masked out gets zeros, as the bf16 kernel gives, where torch gives NaN."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 3, 20, 20, 64))
    m = torch.zeros(2, 1, 20, 20)
    m[1, :, 4] = float("-inf")
    out = torch.ops.cpuboost.attention_f32(q, k, v, m, 0.125)
    assert torch.equal(out[1, :, 4], torch.zeros(3, 64))
    ref = _ref(q, k, v, m, 0.125)
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, 4] = False
    assert rel_err(ref.transpose(1, 2)[keep], out.transpose(1, 2)[keep]) <= TOL


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    q, k, v = _qkv(2, 6, 50, 50, 64)
    assert same_at_every_thread_count(
        lambda: torch.ops.cpuboost.attention_f32(q, k, v, None, 0.125))


@needs_kernel
def test_bad_arguments_say_what_is_wrong():
    q, k, v = _qkv(1, 2, 4, 4, 8)
    op = torch.ops.cpuboost.attention_f32
    with pytest.raises(RuntimeError, match="float32 q, k, v"):
        op(q.double(), k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="do not match"):
        op(q, k[:, :, :3], v, None, 1.0)
    with pytest.raises(RuntimeError, match="does not broadcast to the scores"):
        op(q, k, v, torch.zeros(1, 1, 4, 5), 1.0)
    with pytest.raises(RuntimeError, match="head dim must be contiguous"):
        op(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, 1.0)


@needs_kernel
def test_fp32_and_int8_graphs_use_it():
    """On AVX2 CPUs (no bf16 kernel there) a compiled fp32 BERT's attention runs the fp32 kernel,
    within fp32 tolerance of eager; so does an int8 graph's."""
    from torch._inductor import config as cfg
    torch._dynamo.reset()
    model, inputs = _tiny_bert()
    with cfg.patch(fx_graph_cache=False), torch.no_grad():
        opt = cpuboost.optimize(model, graph_mode=True, sample_input=inputs)
        ref, out = model(**inputs).last_hidden_state, opt(**inputs).last_hidden_state
    note = "0 attention(s) on cpuboost's bf16 kernel, 2 on its fp32 kernel"  # 2 layers
    assert note in _attention_note(opt)  # gemm_ops(): AVX2 without AVX-512, so no bf16 kernel
    assert rel_err(ref, out) <= 1e-4
    torch._dynamo.reset()
    with cfg.patch(fx_graph_cache=False):
        q = cpuboost.quantize(model, [inputs], example_inputs=inputs, graph_mode=True)
    assert note in _attention_note(q)
    with torch.no_grad():
        cos = F.cosine_similarity(ref.flatten(), q(**inputs).last_hidden_state.flatten(), 0)
    assert cos > 0.99
