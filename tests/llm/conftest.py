"""Tiny causal LMs with random weights, one per architecture family (no downloads)."""
import pytest
import torch
import transformers

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=128,
                                                      num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(intermediate_size=128,
                                                            num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=128,
                                                      num_key_value_heads=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(intermediate_size=128, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=128)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64)),
    # no dedicated support anywhere in cpuboost (ALiBi attention, its own module names)
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_head=4, n_layer=2)),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    cfg_name, model_name, extra = CONFIGS[arch]
    kwargs = {**COMMON, **extra}
    if arch == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in COMMON or k == "vocab_size"}
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kwargs))
    with torch.no_grad():  # peaked logits: greedy choices are not near-ties
        model.get_output_embeddings().weight.mul_(8)
    return model.eval()


@pytest.fixture(params=sorted(CONFIGS))
def arch(request):
    return request.param


def prompts(batch: int = 2, length: int = 12, pad_first: int = 4):
    """Two prompts, the first left-padded by ``pad_first`` tokens (batch with padding)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad_first] = 0
    ids[0, :pad_first] = 0
    return ids, mask
