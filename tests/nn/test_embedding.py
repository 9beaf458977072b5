import copy

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.nn.embedding import HeldEmbedding, HeldEmbeddingBag, Int8Embedding, Int8EmbeddingBag
from cpuboost.verify import sqnr_db
from tests.conftest import rel_err, run, toy


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("last_offset", [False, True])
def test_embedding_bag_held_in_bf16(mode, last_offset):
    torch.manual_seed(0)
    src = nn.EmbeddingBag(100, 16, mode=mode, include_last_offset=last_offset)
    held = HeldEmbeddingBag(src)
    ids = torch.randint(0, 100, (12,))
    offsets = torch.tensor([0, 2, 7, 12] if last_offset else [0, 2, 7])
    with torch.no_grad():
        ref, out = src(ids, offsets), held(ids, offsets)
    assert out.dtype == torch.float32 and rel_err(ref, out) <= 1e-2
    assert held.weight_bytes() == 100 * 16 * 2


def test_per_sample_weights_and_state_dict():
    torch.manual_seed(0)
    src = nn.EmbeddingBag(30, 4, mode="sum")
    held = HeldEmbeddingBag(src)
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
    held = HeldEmbedding(src)
    out = held(torch.tensor([[0, 3]]))
    assert out.dtype == torch.float32 and torch.equal(out[0, 0], torch.zeros(4))


def test_optimize_holds_tables_in_bf16_only_in_bf16_mode(emulated_bf16):
    case, model = toy("recommender")
    x = case.inputs(4)
    bf16 = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
    assert isinstance(bf16.bag, HeldEmbeddingBag) and isinstance(bf16.emb, HeldEmbedding)
    assert bf16.bag.compute_dtype == torch.bfloat16
    fp32 = cpuboost.optimize(model, sample_input=x)
    assert fp32.bag.compute_dtype == torch.float32 and fp32.emb.compute_dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert run(bf16, case, x).dtype == run(model, case, x).dtype


def test_fp32_table_shares_storage_and_takes_forward_only_kernel():
    torch.manual_seed(0)
    src = nn.EmbeddingBag(40, 8, mode="mean")
    held = HeldEmbeddingBag(src, torch.float32)
    assert held._w.data_ptr() == src.weight.data_ptr() and not held._w.requires_grad
    ids, offsets = torch.randint(0, 40, (9,)), torch.tensor([0, 4, 6])
    with torch.no_grad():
        assert torch.equal(src(ids, offsets), held(ids, offsets))
    assert held.state_dict()["weight"].data_ptr() == src.weight.data_ptr()


def test_lookup_returns_bf16_only_where_every_user_casts_to_bf16(emulated_bf16):
    """In the recommender the pooled rows go through cat into a packed bf16 Linear: returning
    bf16 skips a round trip through fp32 and changes no value."""
    case, model = toy("recommender")
    x = case.inputs(4)
    bf16 = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=x)
    assert bf16.bag.out_dtype == torch.bfloat16 and bf16.emb.out_dtype == torch.bfloat16
    with torch.no_grad():
        for m in (bf16.bag, bf16.emb):
            m.out_dtype = torch.float32
        wide = run(bf16, case, x)
        bf16.bag.out_dtype = bf16.emb.out_dtype = torch.bfloat16
        assert torch.equal(run(bf16, case, x), wide)


class _PooledOut(nn.Module):
    """The pooled rows are returned as well as used: they must keep the original dtype."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode="sum")
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        pooled = self.bag(ids)
        return self.fc(pooled), pooled.sum(dim=1)


def test_lookup_keeps_original_dtype_when_a_user_does_not_cast(emulated_bf16):
    model = _PooledOut().eval()
    ids = torch.randint(0, 30, (5, 3))
    opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=(ids,))
    assert opt.bag.out_dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids)
    with torch.no_grad():
        out = opt(ids)
    assert [t.dtype for t in out] == [t.dtype for t in ref]


def test_max_norm_table_is_not_converted():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)).eval()
    opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input=torch.tensor([1, 2]))
    assert "max_norm" in dict(cpuboost.report_of(opt).pass_named("embedding_tables").skipped)["0"]


def test_tied_lm_head_reads_the_same_bf16_table(emulated_bf16):
    """GPT-2's lm_head is tied to the token embedding: in bf16 both read one bf16 matrix
    (autocast re-cast the fp32 head on every call; one copy, half the bytes)."""
    transformers = pytest.importorskip("transformers")
    from cpuboost.nn import FusedLinear
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(5, 300, (2, 7))
    opt = cpuboost.optimize(model, dtype=torch.bfloat16, sample_input={"input_ids": ids})
    head, table = opt.lm_head, opt.transformer.wte
    assert isinstance(head, FusedLinear) and isinstance(table, HeldEmbedding)
    assert head._w is table._w and table._w.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids).logits
    with torch.no_grad():
        out = opt(ids).logits
    assert out.dtype == ref.dtype and rel_err(ref.float(), out.float()) <= 5e-2
    assert set(opt.state_dict()) == set(model.state_dict())
    report = cpuboost.report_of(opt)
    assert report.weight_bytes_after < 0.6 * report.weight_bytes_before


# -- int8 tables -------------------------------------------------------------------------


INT8_TABLE_SQNR = 35.0  # dB: 8 bits per row with its own scale and offset


def _bags(rows, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (sum(sizes),), generator=g)
    offsets = torch.tensor([0] + list(sizes[:-1])).cumsum(0)
    return ids, offsets


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("sizes", [(1, 1, 1), (20,) * 8, (3, 0, 41, 7, 20)], ids=["1", "20", "mixed"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("last_offset", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_int8_embedding_bag_matches_float(mode, sizes, weighted, last_offset, padding_idx):
    if weighted and mode != "sum":
        pytest.skip("torch takes per_sample_weights only with mode='sum'")
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(50, 16, mode=mode, include_last_offset=last_offset,
                          padding_idx=padding_idx).eval()
    q = Int8EmbeddingBag(bag)
    ids, offsets = _bags(50, sizes)
    ids[::5] = 2  # some padding entries when padding_idx=2
    if last_offset:
        offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
    psw = torch.rand(ids.numel()) if weighted else None
    y = q(ids, offsets, psw)
    torch.testing.assert_close(y, q.reference_forward(ids, offsets, psw), atol=1e-5, rtol=1e-5)
    ref = bag(ids, offsets, per_sample_weights=psw)
    assert y.shape == ref.shape
    assert sqnr_db(ref, y) > INT8_TABLE_SQNR
    assert q.weight_bytes() == 50 * (16 + 8)


def test_int8_embedding_bag_2d_input_and_int32_ids():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(30, 8, mode="mean").eval()
    q = Int8EmbeddingBag(bag)
    ids = torch.randint(0, 30, (4, 6))
    assert sqnr_db(bag(ids), q(ids)) > INT8_TABLE_SQNR
    flat, offsets = ids.reshape(-1), torch.arange(0, 24, 6)
    torch.testing.assert_close(q(flat.int(), offsets.int()), q(ids))


def test_int8_embedding_matches_float():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 12, padding_idx=0).eval()
    q = Int8Embedding(emb)
    ids = torch.randint(0, 40, (3, 7))
    y = q(ids)
    assert y.shape == (3, 7, 12)
    torch.testing.assert_close(y, q.reference_forward(ids), atol=1e-5, rtol=1e-5)
    assert sqnr_db(emb(ids), y) > INT8_TABLE_SQNR


def test_int8_embedding_bag_refuses_max():
    with pytest.raises(ValueError, match="sum"):
        Int8EmbeddingBag(nn.EmbeddingBag(10, 4, mode="max"))
