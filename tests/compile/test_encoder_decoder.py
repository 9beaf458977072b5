"""optimize(graph_mode=True) on encoder-decoder models: generate() runs the encoder module on its
own (once per request), so graph mode compiles it too, beside forward (the decoder steps). A
full forward (the encoder traced into the model's graph) is in test_hf_backend.py."""
import copy
import inspect

import pytest
import torch

import cpuboost

transformers = pytest.importorskip("transformers")
T = transformers


def _t5():
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=300, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _bart():  # the encoder is one level down: model.encoder
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=300, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_position_embeddings=64))


MODELS = {"t5": (_t5, "encoder"), "bart": (_bart, "model.encoder")}


def _request():
    ids = torch.randint(5, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    return ids, dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                     min_new_tokens=8, num_beams=2, do_sample=False)


def _encoder_forward(model, path):
    return model.get_submodule(path).__dict__["forward"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in ("t5", "bart")])
def test_generate_compiles_the_encoder_and_leaves_the_callers_model_alone(name):
    build, path = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    ids, gen = _request()
    with torch.no_grad():
        ref = model.generate(**gen)
        fast = cpuboost.optimize(model, graph_mode=True)
        assert torch.equal(fast.generate(**gen), ref)
        assert torch.equal(fast.generate(**gen), ref)
    encoder = _encoder_forward(fast, path)
    assert encoder.compiled.graphs == 1 and encoder.compiled.calls == 2
    # what generate() inspects to pick the encoder's arguments: the module's own signature
    original = model.get_submodule(path)
    assert inspect.signature(fast.get_submodule(path).forward) == \
        inspect.signature(original.forward)
    # inplace=False: the caller's model and its encoder are as they were
    assert "forward" not in original.__dict__ and "forward" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model.generate(**gen), ref)
    applied = cpuboost.report_of(fast).pass_named("graph_mode").applied
    assert any(a.startswith("encoder compiled with backend 'cpuboost'") for a in applied)


def test_inplace_releases_the_encoders_weights_too():
    """One weight release for the model: the encoder's graph and the decoder steps' graphs
    hold their Linear weights packed, and a copy of the weights equals the original."""
    from cpuboost.kernels import gemm_ops, gemm_unavailable
    if not gemm_ops():
        pytest.skip(f"cpuboost's AVX2 kernel: {gemm_unavailable()}")
    torch.manual_seed(0)
    model = _t5().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, gen = _request()
    with torch.no_grad():
        ref = model.generate(**gen)
        cpuboost.optimize(model, graph_mode=True, inplace=True)
        assert torch.equal(model.generate(**gen), ref)
        released = {n for n, p in model.named_parameters() if p.untyped_storage().nbytes() == 0}
        assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in released
        assert "decoder.block.0.layer.2.DenseReluDense.wo.weight" in released
        assert torch.equal(model.generate(**gen), ref)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert _encoder_forward(model, "encoder").compiled.release is \
        model.__dict__["forward"].release
    # a copy (it compiles afresh) shares its own model's release, not the original's
    copied = copy.deepcopy(model)
    encoder = _encoder_forward(copied, "encoder")
    assert encoder.model is copied.encoder and encoder.compiled.model is copied.encoder
    assert encoder.compiled.release is copied.__dict__["forward"].release is not None
    assert copied.__dict__["forward"].release is not model.__dict__["forward"].release
    assert torch.equal(copied.state_dict()["encoder.block.0.layer.1.DenseReluDense.wi.weight"],
                       state["encoder.block.0.layer.1.DenseReluDense.wi.weight"])
