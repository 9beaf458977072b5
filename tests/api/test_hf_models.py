"""Hugging Face models built from small configs with random weights (no downloads)."""
import pytest
import torch

import cpuboost
from tests.conftest import BF16_RTOL, FP32_RTOL, onednn_packs, rel_err

transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=500)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _bert_inputs(seq, batch=2):
    ids = torch.randint(5, 500, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0  # padding in the first sequence
    return {"input_ids": ids, "attention_mask": mask}


def _resnet():
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2],
                                    num_labels=7)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_bert_variable_lengths(dtype, emulated_bf16):
    model = _bert()
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=_bert_inputs(16))
    report = cpuboost.report_of(opt)
    assert report.numerics.passed, str(report)
    assert len(report.applied("prepack")) == 2 * 6 + 2  # q,k,v,o,ffn x2 per layer; pooler; classifier
    if onednn_packs(dtype or torch.float32):  # aten's kernels (bf16 on AVX2) take no post-op
        assert report.applied("fuse_pointwise")  # intermediate dense + GELU
    for seq in (7, 16, 33):  # lengths other than the sample's
        x = _bert_inputs(seq)
        with torch.no_grad():
            ref, out = model(**x).logits, opt(**x).logits
        assert rel_err(ref, out.float()) <= (BF16_RTOL if dtype else FP32_RTOL)
        if dtype:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert out.dtype == model(**x).logits.dtype


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_resnet_folds_and_fuses(dtype):
    model = _resnet()
    x = torch.randn(2, 3, 64, 64)
    opt = cpuboost.optimize(model, dtype=dtype, sample_input=x)
    report = cpuboost.report_of(opt)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(report.applied("fold_bn")) == n_bn
    if onednn_packs(dtype or torch.float32):
        assert report.applied("fuse_pointwise")
    with torch.no_grad():
        assert rel_err(model(x).logits, opt(x).logits.float()) <= (BF16_RTOL if dtype else FP32_RTOL)


def _xlm_roberta_clm():
    cfg = transformers.XLMRobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=500, is_decoder=True)
    torch.manual_seed(0)
    return transformers.XLMRobertaForCausalLM(cfg).eval()


def test_generate_sees_the_models_own_forward_signature():
    """generate() chooses its keyword arguments from inspect.signature(model.forward): behind
    cpuboost's stand-ins for forward it saw (*args, **kwargs), passed no position_ids, and
    XLM-R's causal LM (which numbers positions from its padding index without them) generated
    other tokens than stock on the first generate() of an optimize()d model, and on every one
    of an llm.optimize()d one."""
    import inspect
    model = _xlm_roberta_clm()
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
              min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**kw)
        own = inspect.signature(model.forward)
        made = {"pending first call": cpuboost.optimize(model),
                "llm": cpuboost.llm.optimize(model, dtype=torch.float32),
                "graph_mode": cpuboost.optimize(model, graph_mode=True)}  # compiles when called
        for name, fast in made.items():
            assert inspect.signature(fast.forward) == own, name
            if name != "graph_mode":
                seen = []  # the keywords generate() passes through the stand-in
                hook = fast.register_forward_pre_hook(
                    lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
                try:
                    assert torch.equal(fast.generate(**kw), ref), name
                finally:
                    hook.remove()
                assert {"position_ids", "logits_to_keep"} <= seen[0], (name, seen[0])
