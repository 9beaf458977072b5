import copy

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn.embedding import LowPrecisionEmbedding, LowPrecisionEmbeddingBag
from tests.conftest import rel_err, run, toy


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("last_offset", [False, True])
def test_embedding_bag_held_in_bf16(mode, last_offset):
    torch.manual_seed(0)
    src = nn.EmbeddingBag(100, 16, mode=mode, include_last_offset=last_offset)
    held = LowPrecisionEmbeddingBag(src)
    ids = torch.randint(0, 100, (12,))
    offsets = torch.tensor([0, 2, 7, 12] if last_offset else [0, 2, 7])
    with torch.no_grad():
        ref, out = src(ids, offsets), held(ids, offsets)
    assert out.dtype == torch.float32 and rel_err(ref, out) <= 1e-2
    assert held.weight_bytes() == 100 * 16 * 2


def test_per_sample_weights_and_state_dict():
    torch.manual_seed(0)
    src = nn.EmbeddingBag(30, 4, mode="sum")
    held = LowPrecisionEmbeddingBag(src)
    ids, w = torch.randint(0, 30, (5, 3)), torch.rand(5, 3)
    with torch.no_grad():
        assert rel_err(src(ids, per_sample_weights=w), held(ids, per_sample_weights=w)) <= 1e-2
    sd = held.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].dtype == torch.float32
    other = nn.EmbeddingBag(30, 4, mode="sum")
    held.load_state_dict(other.state_dict())
    assert torch.allclose(held.weight, other.weight.detach(), rtol=1e-2, atol=1e-2)
    assert torch.equal(copy.deepcopy(held)(ids), held(ids))


def test_embedding_keeps_padding_row():
    src = nn.Embedding(10, 4, padding_idx=0)
    held = LowPrecisionEmbedding(src)
    out = held(torch.tensor([[0, 3]]))
    assert out.dtype == torch.float32 and torch.equal(out[0, 0], torch.zeros(4))


def test_optimize_holds_tables_in_bf16_only_in_bf16_mode():
    case, model = toy("recommender")
    x = case.inputs(4)
    bf16 = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
    assert isinstance(bf16.bag, LowPrecisionEmbeddingBag) and isinstance(bf16.emb, LowPrecisionEmbedding)
    fp32 = cpuboost.optimize(model, sample_input=x)
    assert type(fp32.bag) is nn.EmbeddingBag
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert run(bf16, case, x).dtype == run(model, case, x).dtype


def test_max_norm_table_is_not_converted():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)).eval()
    opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=torch.tensor([1, 2]))
    assert "max_norm" in dict(cpuboost.report_of(opt).pass_named("embedding_dtype").skipped)["0"]
