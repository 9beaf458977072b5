"""`cpuboost bench --llm`: generation speed of a Llama-style model with random weights.

Per variant: prefill latency (one forward over a 512-token prompt, batch 1), decode tokens/s at
batch 1 and 8 (between the first and the last token of a generate() call, timed by a logits
processor at every step, so the prompt's processing is excluded), the weight bytes a decode step
reads, and the bandwidth that implies, next to this machine's measured copy and read bandwidth.
All variants of a process are timed round-robin.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch
from torch import nn

from cpuboost.bench.harness import PeakRss, rss_mb

EAGER = ("stock_bf16", "cpuboost_bf16", "cpuboost_woq_int8", "cpuboost_woq_int4")
COMPILED = ("stock_compile_bf16",)
SIZES = {  # Llama-style configs; "1b" has TinyLlama-1.1B's shapes
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,  # tests
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=32000),
}


def build(size: str) -> nn.Module:
    """A Llama-style causal LM in bf16 with random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a full fp32 copy
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def memory_bandwidth(mib: int = 512, reps: int = 5) -> dict[str, float]:
    """GB/s of a ``mib`` MiB buffer (pages touched first, so nothing is served from the
    shared zero page), best of ``reps``: ``copy`` counts the bytes a copy reads (it writes as
    many: ``copy_rw`` counts both), ``read`` the bytes a sum reads."""
    src = torch.ones(mib << 18, dtype=torch.float32)
    dst = torch.zeros_like(src)
    best = {"copy": float("inf"), "read": float("inf")}
    for _ in range(reps):
        for key, fn in (("copy", lambda: dst.copy_(src)), ("read", src.sum)):
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    size = src.numel() * src.element_size()
    return {"copy": size / best["copy"] / 1e9, "copy_rw": 2 * size / best["copy"] / 1e9,
            "read": size / best["read"] / 1e9}


def decode_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: every weight except the embedding table (one row of it)."""
    from cpuboost.passes import weight_bytes
    emb = model.get_input_embeddings().weight
    return weight_bytes(model) - emb.numel() * emb.element_size()


def _variant(name: str, model: nn.Module) -> nn.Module:
    import cpuboost.llm
    if name == "stock_bf16":
        return model
    if name == "stock_compile_bf16":
        compiled = torch.compile(model.forward)
        clone = _shallow(model)
        clone.forward = compiled
        clone.generation_config.cache_implementation = "static"  # what transformers advises
        clone.generation_config.max_cache_len = 256  # one cache shape for every timed call
        return clone
    quant = {"cpuboost_bf16": None, "cpuboost_woq_int8": "woq_int8",
             "cpuboost_woq_int4": "woq_int4"}[name]
    return cpuboost.llm.optimize(model, dtype=torch.bfloat16, quantization=quant)


def _shallow(model: nn.Module) -> nn.Module:
    import copy
    clone = copy.copy(model)
    clone.generation_config = copy.deepcopy(model.generation_config)
    return clone


def _generate_s(model, ids: torch.Tensor, new: int, stamps=None) -> float:
    from transformers import LogitsProcessorList
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([stamps] if stamps else []))
        return time.perf_counter() - t0


class _Stamps:
    """A logits processor that records when each step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _measures(model, prompt: int, tokens: int) -> dict[str, Callable[[], float]]:
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, 30000, (1, 512), generator=gen)

    def prefill() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(long_ids)
            return (time.perf_counter() - t0) * 1e3

    def decode(batch: int) -> Callable[[], float]:
        ids = torch.randint(100, 30000, (batch, prompt), generator=gen)

        def rate() -> float:
            stamps = _Stamps()
            _generate_s(model, ids, tokens + 1, stamps)
            steps = len(stamps.times) - 1  # decode steps after the prompt's
            return batch * steps / (stamps.times[-1] - stamps.times[0])
        return rate

    return {"prefill_ms": prefill, "decode_tok_s_bs1": decode(1), "decode_tok_s_bs8": decode(8)}


def run_llm(size: str, variants, rounds: int, prompt: int = 64, tokens: int = 32) -> dict:
    bandwidth = memory_bandwidth()
    base = build(size)
    models, setup = {}, {}
    for name in variants:
        with PeakRss() as mem:
            t0 = time.perf_counter()
            models[name] = _variant(name, base)
            _generate_s(models[name], torch.ones(1, 8, dtype=torch.long), 4)  # warm-up/compile
            setup[name] = (time.perf_counter() - t0, mem)
    measures = {name: _measures(m, prompt, tokens) for name, m in models.items()}
    samples = {name: {k: [] for k in ms} for name, ms in measures.items()}
    for r in range(rounds + 1):  # round 0 warms up (and compiles every shape): not counted
        for name, ms in measures.items():
            for key, fn in ms.items():
                value = fn()
                if r:
                    samples[name][key].append(value)
    rows = []
    for name, model in models.items():
        row = {"variant": name, "setup_s": setup[name][0], "peak_rss_mb": setup[name][1].peak,
               "decode_bytes": decode_bytes(model)}
        row.update({k: statistics.median(v) for k, v in samples[name].items()})
        row["bandwidth_gb_s"] = row["decode_bytes"] * row["decode_tok_s_bs1"] / 1e9
        rows.append(row)
    ref = next((r for r in rows if r["variant"] == "stock_bf16"), None)
    for r in rows:
        for key in ("decode_tok_s_bs1", "decode_tok_s_bs8"):
            r[key.replace("decode_tok_s", "speedup")] = r[key] / ref[key] if ref else None
        r["prefill_speedup"] = ref["prefill_ms"] / r["prefill_ms"] if ref else None
    params = sum(p.numel() for p in base.parameters())
    return {"case": f"llama_{size}", "params": params, "copy_bandwidth_gb_s": bandwidth["copy"],
            "copy_rw_bandwidth_gb_s": bandwidth["copy_rw"],
            "read_bandwidth_gb_s": bandwidth["read"], "rows": rows,
            "threads": torch.get_num_threads()}


def memory_llm(size: str) -> dict:
    """Peak RSS of ``llm.optimize(model, quantization='woq_int8', inplace=True)`` over the RSS
    before the bf16 model was built, against the model's own size (fresh process expected)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the baseline)
    import cpuboost.llm
    from cpuboost._memory import release_freed_memory
    gc.collect()
    before = rss_mb()
    model = build(size)
    model_mb = sum(t.numel() * t.element_size()
                   for t in list(model.parameters()) + list(model.buffers())) / 2**20
    with PeakRss() as mem:
        model = cpuboost.llm.optimize(model, quantization="woq_int8", inplace=True)
    gc.collect()
    release_freed_memory()
    return {"case": f"llama_{size}", "model_mb": model_mb, "rss_before_mb": before,
            "peak_added_mb": mem.peak - before, "after_added_mb": rss_mb() - before,
            "peak_ratio": (mem.peak - before) / model_mb}


def print_llm(result: dict, memory: dict | None) -> None:
    print(f"\n{result['case']}: {result['params'] / 1e9:.2f}B parameters, "
          f"{result['threads']} threads; bandwidth: copy {result['copy_bandwidth_gb_s']:.1f} "
          f"GB/s read ({result.get('copy_rw_bandwidth_gb_s', 0):.1f} read+written), "
          f"sum {result.get('read_bandwidth_gb_s', 0):.1f} GB/s read. '% copy': a decode "
          "step's weight bytes x tokens/s at batch 1 over the copy's read rate")
    print(f"{'variant':<22} {'prefill ms':>10} {'x':>6} {'tok/s bs1':>9} {'x':>6} "
          f"{'tok/s bs8':>9} {'x':>6} {'GB/token':>8} {'GB/s':>6} {'% copy':>6} {'setup s':>7}")
    for r in result["rows"]:
        print(f"{r['variant']:<22} {r['prefill_ms']:>10.0f} {r['prefill_speedup']:>5.2f}x "
              f"{r['decode_tok_s_bs1']:>9.2f} {r['speedup_bs1']:>5.2f}x "
              f"{r['decode_tok_s_bs8']:>9.2f} {r['speedup_bs8']:>5.2f}x "
              f"{r['decode_bytes'] / 1e9:>8.2f} {r['bandwidth_gb_s']:>6.1f} "
              f"{100 * r['bandwidth_gb_s'] / result['copy_bandwidth_gb_s']:>5.0f}% "
              f"{r['setup_s']:>7.1f}")
    if memory:
        print(f"woq_int8 optimize (inplace): peak +{memory['peak_added_mb']:.0f} MiB over a "
              f"{memory['model_mb']:.0f} MiB bf16 model ({memory['peak_ratio']:.2f}x), "
              f"+{memory['after_added_mb']:.0f} MiB after")


__all__ = ["COMPILED", "EAGER", "SIZES", "build", "memory_bandwidth", "memory_llm", "print_llm",
           "run_llm"]
