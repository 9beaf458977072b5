"""cpuboost's decode attention against torch's SDPA (the reference) for every path it takes."""
import pytest
import torch
import torch.nn.functional as F

from cpuboost.llm.attention import MATH_FROM, attention, decode_attention


def reference(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                         attn_mask=None if mask is None else mask, scale=scale)
    return out.transpose(1, 2)


def padding_mask(n, length, kind):
    keep = torch.ones(n, 1, 1, length, dtype=torch.bool)
    keep[0, ..., :3] = False  # the first row was left-padded by 3
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("length", [5, MATH_FROM, 150])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_sdpa(heads, kv_heads, length, mask_kind, dtype, tol):
    g = torch.Generator().manual_seed(0)
    n, d = 3, 16
    q = torch.randn(n, heads, 1, d, generator=g).to(dtype)
    k = torch.randn(n, kv_heads, length, d, generator=g).to(dtype)
    v = torch.randn(n, kv_heads, length, d, generator=g).to(dtype)
    mask = None if mask_kind is None else padding_mask(n, length, mask_kind)
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask)
    out = decode_attention(q, k, v, mask, 0.3)
    assert out.shape == (n, 1, heads, d) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), reference(q, k, v, ref_mask, 0.3), rtol=tol, atol=tol)


def test_per_head_mask_follows_its_head():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g),
               torch.randn(2, 2, 10, 8, generator=g))
    mask = torch.zeros(2, 4, 1, 10)
    mask[:, 1, :, :4] = float("-inf")  # only head 1 ignores the first 4 positions
    torch.testing.assert_close(decode_attention(q, k, v, mask, None),
                               reference(q, k, v, mask, 8 ** -0.5), rtol=1e-5, atol=1e-5)


def test_other_calls_go_to_transformers():
    class M(torch.nn.Module):
        num_key_value_groups, is_causal = 1, True
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    out, weights = attention(M(), q, k, v, None, scaling=None)  # prefill: causal SDPA
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)
                               .transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert weights is None
