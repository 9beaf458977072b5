"""The preallocated KV cache and the beam-search cache that holds the prompt once."""
import pytest
import torch

import cpuboost
from cpuboost.llm.beam import BeamLayer, PrefixNotConsumed
from cpuboost.llm.cache import PreallocatedCache, PreallocatedLayer
from tests.llm.conftest import prompts, tiny_model


def kv(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4,
                                                                      generator=g)


def test_layer_writes_in_place_and_grows_past_capacity():
    layer = PreallocatedLayer(capacity=6)
    parts = [kv(2, 4, 0), kv(2, 1, 1), kv(2, 1, 2)]
    keys, _ = layer.update(*parts[0])
    storage = layer._k
    for k, v in parts[1:]:
        keys, values = layer.update(k, v)
    assert layer._k is storage and storage.shape[-2] == 6  # no reallocation within capacity
    assert torch.equal(keys, torch.cat([p[0] for p in parts], dim=-2))
    keys, _ = layer.update(*kv(2, 1, 3))  # 7 > 6: grows once, keeps the content
    assert layer._k.shape[-2] >= 7 and torch.equal(keys[:, :, :6], storage)
    layer.crop(-2)
    assert layer.get_seq_length() == 5
    keys, _ = layer.update(*kv(2, 1, 4))
    assert torch.equal(keys[:, :, 5], kv(2, 1, 4)[0][:, :, 0])


def test_reorder_and_batch_select():
    layer = PreallocatedLayer(capacity=8)
    k, v = kv(3, 4, 0)
    layer.update(k, v)
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(layer.keys, k[[2, 2, 0]])
    layer.batch_select_indices(torch.tensor([0, 2]))
    keys, _ = layer.update(*kv(2, 1, 1))
    assert torch.equal(keys[:, :, :4], k[[2, 0]])


def test_beam_layer_holds_the_prompt_once_and_refuses_unconsumed_prefix():
    layer = BeamLayer(capacity=8, beams=3)
    k, v = kv(1, 5, 0)
    layer.update(k.repeat_interleave(3, 0), v.repeat_interleave(3, 0))  # prompt, 3 beams
    assert layer.prefix[0].shape == (1, 2, 5, 4)
    keys, _ = layer.update(*kv(3, 1, 1))
    assert keys.shape == (1, 2, 3, 4) and layer.get_seq_length() == 6  # 1 step x 3 beam slots
    with pytest.raises(PrefixNotConsumed, match="beam_cache=False"):
        layer.update(*kv(3, 1, 2))  # nothing attended over the prompt part


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_beam_search_uses_the_prompt_once_cache(arch):
    model = tiny_model(arch)
    fast = cpuboost.llm.optimize(model, dtype=torch.float32)
    assert cpuboost.report_of(fast).applied("beam_cache")
    assert model.config._attn_implementation == "sdpa"  # the original is untouched
    seen = []
    original = PreallocatedCache.__init__

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        seen.append(self)

    ids, mask = prompts()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
              num_beams=4, do_sample=False, pad_token_id=0)
    rows = []
    own_forward = type(fast).forward

    def count_rows(self, *a, **k):
        rows.append(k["input_ids"].shape[0])
        return own_forward(self, *a, **k)
    with torch.no_grad():
        PreallocatedCache.__init__ = spy
        type(fast).forward = count_rows
        try:
            got = fast.generate(**kw)
        finally:
            PreallocatedCache.__init__ = original
            type(fast).forward = own_forward
        want = model.generate(**kw)
    assert torch.equal(got, want)
    layers = [layer for layer in seen[0].layers if isinstance(layer, BeamLayer)]
    assert layers and all(layer.prefix[0].shape[0] == 2 for layer in layers)  # 2 requests
    assert rows[0] == 2 and set(rows[1:]) == {8}  # the prompt once per request, steps per beam


def test_beam_cache_not_applied_where_attention_is_the_models_own():
    fast = cpuboost.llm.optimize(tiny_model("bloom"), dtype=torch.float32)
    rec = cpuboost.report_of(fast).pass_named("beam_cache")
    assert not rec.applied and "not SDPA" in rec.skipped[0][1]
    ids, mask = prompts()
    with torch.no_grad():
        out = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                            do_sample=False, pad_token_id=0)
    assert out.shape == (2, 18)


def test_generate_writes_into_the_preallocated_cache(monkeypatch):
    """generate() builds a PreallocatedCache (not transformers' DynamicCache) and every
    decode step goes through PreallocatedLayer.update."""
    fast = cpuboost.llm.optimize(tiny_model("llama"), dtype=torch.float32)
    updates = []
    original = PreallocatedLayer.update

    def counting(self, *args, **kwargs):
        updates.append(args[0].shape[-2])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreallocatedLayer, "update", counting)
    ids, mask = prompts()
    with torch.no_grad():
        fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                      do_sample=False, pad_token_id=0)
    layers = fast.config.num_hidden_layers
    assert updates == [12] * layers + [1] * (4 * layers)  # the prompt, then 4 decode steps


def test_beam_reorder_moves_no_keys_and_attention_follows_each_path():
    """The same prompt, steps and reorders through a BeamLayer and a plain per-beam layer: the
    beam layer's slots never move, and its attention equals attention over the plain paths."""
    import torch.nn.functional as F
    from cpuboost.llm.beam import beam_step
    beams, requests, heads = 3, 2, 4
    beam_layer, plain = BeamLayer(capacity=4, beams=beams), PreallocatedLayer(capacity=4)
    pk, pv = kv(requests, 5, 0)
    prompt = (pk.repeat_interleave(beams, 0), pv.repeat_interleave(beams, 0))
    beam_layer.update(*prompt)
    plain.update(*prompt)
    g = torch.Generator().manual_seed(3)
    for step in range(6):  # past the capacity of 4: the slots grow once
        k, v = kv(requests * beams, 1, 10 + step)
        keys, values = beam_layer.update(k, v)
        ref_k, ref_v = plain.update(k, v)
        q = torch.randn(requests * beams, heads, 1, 4, generator=g)
        out = beam_step(q, keys, values, None, 0.5)
        want = F.scaled_dot_product_attention(q, ref_k.repeat_interleave(2, 1),
                                              ref_v.repeat_interleave(2, 1), scale=0.5)
        torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
        # generate() picks beams: within each request, any beam may continue any other
        idx = torch.randint(0, beams, (requests * beams,), generator=g)
        idx += torch.arange(requests).repeat_interleave(beams) * beams
        filled = (step + 1) * beams
        before = beam_layer._slots[0][:, :, :filled].clone()
        beam_layer.reorder_cache(idx)
        plain.reorder_cache(idx)
        assert torch.equal(beam_layer._slots[0][:, :, :filled], before)  # only the paths moved
    assert beam_layer.get_seq_length() == plain.get_seq_length() == 11
    beam_layer.batch_select_indices(torch.arange(requests * beams))  # back to plain caches
    assert torch.equal(beam_layer.keys, plain.keys) and torch.equal(beam_layer.values,
                                                                    plain.values)
