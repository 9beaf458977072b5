"""cpuboost.llm.optimize on every architecture family: generate() output identical to stock
transformers of the same dtype (greedy, beam search, sampling, a padded batch); weight-only
quantization within stated logit tolerances; the report; the original left untouched."""
import copy

import pytest
import torch

import cpuboost
from cpuboost.checks import bf16_weights_only
from cpuboost.hw import detect
from cpuboost.kernels import gemm_ops
from cpuboost.llm.structure import is_linear
from cpuboost.errors import ConfigError, TrainingModeError, UnsupportedRequestError
from cpuboost.llm import WoqConfig
from cpuboost.nn.woq import WoqLinear
from tests.llm.conftest import prompts, tiny_model
from tests.nn.test_woq import sqnr


def generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32,
                              min_new_tokens=32, pad_token_id=0, **kw)


def stock_in(model, dtype):
    """Stock transformers computing what cpuboost computes for ``dtype``: the model in that
    dtype, or, where bf16 means bf16 weights and float32 arithmetic (CPUs without bf16
    instructions), float32 with each linear's weight rounded to bf16 (its own copy: a weight
    tied to the input embedding stays exact there, as in cpuboost's model)."""
    stock = copy.deepcopy(model)
    if not (dtype == torch.bfloat16 and bf16_weights_only(dtype, detect())):
        return stock.to(dtype)
    for m in stock.modules():
        if is_linear(m):
            m.weight = torch.nn.Parameter(m.weight.detach().to(dtype).float())
    return stock


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_identical_to_stock(arch, dtype):
    model = tiny_model(arch)
    stock = stock_in(model, dtype)
    fast = cpuboost.llm.optimize(model, dtype=dtype)
    ids, mask = prompts()
    assert torch.equal(generate(fast, ids, mask, do_sample=False),
                       generate(stock, ids, mask, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_beam_search_and_sampling_identical_to_stock(arch):
    model = tiny_model(arch)
    fast = cpuboost.llm.optimize(model, dtype=torch.float32)
    ids, mask = prompts()
    assert torch.equal(generate(fast, ids, mask, num_beams=3, do_sample=False),
                       generate(model, ids, mask, num_beams=3, do_sample=False))
    torch.manual_seed(7)
    sampled = generate(model, ids, mask, do_sample=True, top_k=20)
    torch.manual_seed(7)
    assert torch.equal(generate(fast, ids, mask, do_sample=True, top_k=20), sampled)


# logit tolerance vs the unquantized model in the same dtype, by SQNR (dB) over the batch
WOQ = [("woq_int8", 30.0), (WoqConfig(bits=4, group_size=32, symmetric=False), 14.0)]


@pytest.mark.parametrize("quantization,floor", WOQ, ids=["int8", "int4_g32"])
def test_woq_logits_close(arch, quantization, floor):
    model = tiny_model(arch)
    ids, mask = prompts()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = cpuboost.llm.optimize(model, dtype=torch.float32, quantization=quantization)(
            input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions carry no meaning
    assert sqnr(want[keep], got[keep]) > floor


def test_woq_generate_runs_in_bf16_and_report_says_what_was_done(arch):
    model = tiny_model(arch)
    fast = cpuboost.llm.optimize(model, quantization="woq_int8")
    ids, mask = prompts()
    out = generate(fast, ids, mask, do_sample=False)
    assert out.shape == (2, 12 + 32)
    report = cpuboost.report_of(fast)
    woq = sum(isinstance(m, WoqLinear) for m in fast.modules())
    assert woq > 0 and f"{woq} linear layers -> woq_int8" in str(report)
    assert report.applied("kv_cache") and report.pass_named("structure").notes
    assert report.weight_bytes_after < report.weight_bytes_before


def test_original_model_untouched_and_weights_shared_not_copied():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = cpuboost.llm.optimize(model, dtype=torch.float32, quantization="woq_int8")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(type(m).__name__ != "WoqLinear" for m in model.modules())
    assert fast.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared
    same = cpuboost.llm.optimize(model, dtype=torch.float32, inplace=True)
    assert same is model


def test_unsupported_shapes_fall_back_and_are_reported():
    model = tiny_model("llama")  # hidden 64: only down_proj (in 128) takes groups of 128
    fast = cpuboost.llm.optimize(model, quantization="woq_int4")
    rec = cpuboost.report_of(fast).pass_named("linears")
    assert rec.skipped and all("group_size 128" in why for _, why in rec.skipped)
    woq = [n for n, m in fast.named_modules() if isinstance(m, WoqLinear)]
    assert woq == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_lm_head_and_skip_options():
    model = tiny_model("llama")
    fast = cpuboost.llm.optimize(model, quantization=WoqConfig(lm_head=False,
                                                               skip=("model.layers.0.*",)))
    assert not isinstance(fast.lm_head, WoqLinear)
    assert not isinstance(fast.model.layers[0].self_attn.q_proj, WoqLinear)
    assert isinstance(fast.model.layers[1].self_attn.q_proj, WoqLinear)


def test_ipex_spelling_quantization_config():
    from cpuboost.quantization import (WoqWeightDtype, WoqWeightQScheme,
                                       get_weight_only_quant_qconfig_mapping)
    model = tiny_model("gpt2")
    qconfig = get_weight_only_quant_qconfig_mapping(weight_dtype=WoqWeightDtype.INT8)
    fast = cpuboost.llm.optimize(model, dtype=torch.float32, quantization_config=qconfig,
                                 deployment_mode=True)
    assert any(isinstance(m, WoqLinear) for m in fast.modules())
    int4 = get_weight_only_quant_qconfig_mapping(weight_dtype=WoqWeightDtype.INT4,
                                                 weight_qscheme=WoqWeightQScheme.SYMMETRIC)
    assert int4 == WoqConfig(bits=4, group_size=128, symmetric=True)
    with pytest.raises(ConfigError, match="int8 activations"):
        get_weight_only_quant_qconfig_mapping(lowp_mode="WoqLowpMode.INT8")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(quantization="int3"), ConfigError, "woq_int8"),
    (dict(quantization=WoqConfig(bits=8), quantization_config="woq_int4"), ConfigError, "both"),
    (dict(dtype=torch.float16), ConfigError, "float32 or torch.bfloat16"),
    (dict(optimizer=object()), UnsupportedRequestError, "optimizer"),
    (dict(low_precision_checkpoint="x.pt"), UnsupportedRequestError, "GPTQ"),
    (dict(device="xpu"), UnsupportedRequestError, "device"),
    (dict(max_seq_len=0), ConfigError, "max_seq_len"),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        cpuboost.llm.optimize(tiny_model("llama"), **kwargs)


def test_training_mode_refused():
    with pytest.raises(TrainingModeError, match="eval"):
        cpuboost.llm.optimize(tiny_model("llama").train())


@pytest.mark.parametrize("kwargs,match", [(dict(bits=3), "8 or 4"),
                                          (dict(bits=8, group_size=64), "per output channel"),
                                          (dict(bits=8, symmetric=False), "symmetric"),
                                          (dict(bits=4, group_size=48), "group_size"),
                                          (dict(skip="model.*"), "tuple")])
def test_woq_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WoqConfig(**kwargs)


@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])
def test_graph_mode_generates_like_stock(arch):
    """Compiled forward: fp32 tokens identical to stock; bf16 logits close (Inductor's fused
    kernels round differently from eager bf16, so tokens may differ on near-ties)."""
    model = tiny_model(arch)
    ids, mask = prompts()
    fast = cpuboost.llm.optimize(model, dtype=torch.float32, graph_mode=True)
    assert torch.equal(generate(fast, ids, mask, do_sample=False),
                       generate(model, ids, mask, do_sample=False))
    fast16 = cpuboost.llm.optimize(model, dtype=torch.bfloat16, graph_mode=True)
    with torch.no_grad():
        got = fast16(input_ids=ids, attention_mask=mask).logits
        want = model(input_ids=ids, attention_mask=mask).logits
    assert sqnr(want[mask.bool()], got[mask.bool()]) > 25
    report = cpuboost.report_of(fast16)
    assert "compiled with backend 'cpuboost'" in str(report)
    checked = report.pass_named("check")  # the eager rewrites, before compilation
    assert "SQNR" in checked.applied[0] and any("not compared" in n for n in checked.notes)


@pytest.mark.skipif(not gemm_ops(), reason="packed fp32 copies are cpuboost's AVX2 kernel's")
def test_graph_mode_inplace_keeps_one_copy_of_each_weight():
    """inplace=True: the float32 weights the compiled graphs hold packed are released (restored
    for each recompilation of generate's prefill and decode graphs); tokens as stock."""
    model = tiny_model("llama")
    ids, mask = prompts()
    want = generate(copy.deepcopy(model), ids, mask, do_sample=False)
    fast = cpuboost.llm.optimize(model, dtype=torch.float32, graph_mode=True, inplace=True)
    assert torch.equal(generate(fast, ids, mask, do_sample=False), want)
    released = [n for n, p in fast.named_parameters() if p.untyped_storage().nbytes() == 0]
    linears = [n for n, m in fast.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(released) >= len(linears) - 1  # all but a head tied to the embedding
    assert any("Linear weight(s)" in n and "released" in n
               for n in cpuboost.report_of(fast).pass_named("graph_mode").notes)


def test_graph_mode_with_woq_is_refused():
    with pytest.raises(ConfigError, match="one or the other"):
        cpuboost.llm.optimize(tiny_model("llama"), quantization="woq_int8", graph_mode=True)


def test_woq_int8_on_a_model_that_reads_a_projection_s_weight():
    """Mamba casts its input to lm_head.weight.dtype before calling lm_head: woq_int8 raised
    AttributeError."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        hidden_size=64, num_hidden_layers=2, vocab_size=500, state_size=8)).eval()
    opt = cpuboost.llm.optimize(model, quantization="woq_int8")
    assert isinstance(opt.lm_head, WoqLinear)
    ids = torch.randint(5, 500, (1, 9))
    with torch.no_grad():
        ref, out = model(ids).logits, opt(ids).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999
