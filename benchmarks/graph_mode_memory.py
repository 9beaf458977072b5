"""RSS of graph mode vs eager, full-size models from configs (random weights): build, run the
request eagerly, then optimize(graph_mode=True) and run the same request again (compiling every
graph it needs) under a 5 ms RSS sampler. One model per process.

Usage: python benchmarks/graph_mode_memory.py MODEL fp32|bf16 [--no-check] [--inplace]   (MODEL:
see BUILD; 'all [MODEL...] [--inplace]' runs those models (default every one) and both dtypes in
fresh processes and prints one table). With --no-check, optimize gets no sample_input: no
numerics check, so no reference output held while compiling. With --inplace, optimize(...,
inplace=True), which releases the weights the graphs hold packed; the request's output is then
compared with eager's (generate: the tokens)."""
import gc
import subprocess
import sys
import time

import torch


def _ids(n, vocab=30000, batch=1):
    return torch.randint(1000, vocab, (batch, n), generator=torch.Generator().manual_seed(0))


def _text(cls, cfg, n=128, **cfg_kw):
    import transformers as T
    ids = _ids(n)
    model = getattr(T, cls)(getattr(T, cfg)(**cfg_kw))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None


def _gpt2_generate():
    import transformers as T
    model = T.GPT2LMHeadModel(T.GPT2Config())
    ids = _ids(16)
    return model, {"input_ids": ids}, dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                          pad_token_id=model.config.eos_token_id)


def _t5_generate():
    import transformers as T
    model = T.T5ForConditionalGeneration(T.T5Config.from_dict(dict(  # t5-base
        d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)))
    ids = _ids(128)
    return model, {"input_ids": ids, "decoder_input_ids": _ids(1)}, dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
        num_beams=4, do_sample=False)


def _image(cls, cfg):
    import transformers as T
    model = getattr(T, cls)(getattr(T, cfg)())
    return model, {"pixel_values": torch.randn(1, 3, 224, 224)}, None


BUILD = {
    "bert": lambda: _text("BertModel", "BertConfig"),
    "xlmr_mlm": lambda: _text("XLMRobertaForMaskedLM", "XLMRobertaConfig", vocab_size=250002),
    "xlmr_clm": lambda: _text("XLMRobertaForCausalLM", "XLMRobertaConfig", vocab_size=250002,
                              is_decoder=True),
    "gpt2": lambda: _text("GPT2LMHeadModel", "GPT2Config"),
    "gpt2_generate": _gpt2_generate,
    "t5_generate": _t5_generate,
    "longformer": lambda: _text("LongformerForSequenceClassification", "LongformerConfig", n=512,
                                vocab_size=50265, max_position_embeddings=4098,  # -base
                                attention_window=512, type_vocab_size=1, pad_token_id=1),
    "vit": lambda: _image("ViTModel", "ViTConfig"),
    "resnet": lambda: _image("ResNetForImageClassification", "ResNetConfig"),
}


def _request(model, inputs, gen):
    with torch.no_grad():
        return model.generate(**gen) if gen else model(**inputs)


def measure(name, dtype_name, check=True, inplace=False):
    import cpuboost
    from cpuboost.bench.harness import PeakRss, rss_mb
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, inputs, gen = BUILD[name]()
    model.eval()
    reference = _request(model, inputs, gen)
    if not inplace:
        reference = None  # (not held: it would count in graph mode's RSS)
    gc.collect()
    eager = rss_mb()
    dt = torch.bfloat16 if dtype_name == "bf16" else None
    t0 = time.perf_counter()
    with PeakRss() as p:
        om = cpuboost.optimize(model, dtype=dt, graph_mode=True, inplace=inplace,
                               sample_input=inputs if check else None)
        out = _request(om, inputs, gen)
    seconds = time.perf_counter() - t0
    gc.collect()
    after = rss_mb()
    graphs = getattr(om.forward, "graphs", 0)
    # with sample_input, graph mode is dropped where it fails the numerics check or, with graph
    # breaks, runs slower than the model's own code: the model then runs the eager passes
    dropped = cpuboost.report_of(om).pass_named("graph_mode").dropped
    if dropped:
        name += f" (graph mode DROPPED: {dropped[:90]}...; eager passes)"
    if inplace:
        released = [n for n in cpuboost.report_of(om).pass_named("graph_mode").notes
                    if n.startswith("inplace=True:")]
        name += f" inplace ({released[0][14:70] if released else 'no release note'}; " \
                f"output {_agreement(reference, out, gen)})"
    print(f"| {name}{'' if check else ' (no sample_input)'} | {dtype_name} | {eager:.0f} | {p.peak:.0f} ({p.peak / eager:.2f}x) | "
          f"{after:.0f} ({after / eager:.2f}x) | {graphs} | {seconds:.0f} |", flush=True)


def _agreement(reference, out, gen) -> str:
    if gen:
        return "tokens equal" if torch.equal(reference, out) else "tokens DIFFER"
    ref = reference[0] if isinstance(reference, tuple) else next(iter(reference.values()))
    got = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    rel = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    return f"max rel diff {rel:.1e}"


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args[0] == "all":
        print("| model | dtype | eager RSS MB | graph mode peak MB | after MB | graphs | "
              "optimize + first request s |\n|---|---|---|---|---|---|---|", flush=True)
        names = args[1:] or list(BUILD)
        for name in names:
            for dt in ("fp32", "bf16"):
                r = subprocess.run([sys.executable, __file__, name, dt, *flags],
                                   capture_output=True, text=True)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
                print(line[-1] if line else f"| {name} | {dt} | failed: "
                      f"{r.stderr.strip().splitlines()[-1:]} |", flush=True)
    else:
        measure(args[0], args[1], check="--no-check" not in flags, inplace="--inplace" in flags)
