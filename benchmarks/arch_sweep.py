"""Eager and graph-mode optimize, int8 and generate across transformers architectures, built
from tiny configs (random weights, no downloads): does each optimize, run and match?

    python benchmarks/arch_sweep.py --mode eager [bert gpt2 ...]
    python benchmarks/arch_sweep.py --mode graph [bert gpt2 ...]
    python benchmarks/arch_sweep.py --mode int8 [bert gpt2 ...]
    python benchmarks/arch_sweep.py --mode int8-saved [bert gpt2 ...]
    python benchmarks/arch_sweep.py --mode generate [gpt2 t5 ...]
    python benchmarks/arch_sweep.py --mode trace [bert gpt2 ...]

``eager``: ``cpuboost.optimize(model)`` in fp32 with and without ``sample_input``, and in bf16:
two calls each against the model's own output, then one on another batch and length (fp32: max
|diff| / max |reference| <= 1e-3; bf16: cosine >= 0.99), and the original model's output
unchanged afterwards.
``graph``: ``cpuboost.optimize(model, graph_mode=True)`` with ``inplace=False`` and ``True``,
without ``sample_input`` (so no numerics check stands between a wrong graph and the caller);
two calls each, both against the model's own output: max |diff| / max |reference| <= 1e-3.
``int8``: static ``cpuboost.quantize`` on three calibration inputs, eagerly and with
``graph_mode=True``: cosine of each against the fp32 output (>= 0.99), and graph against eager
(the same recipe compiled: >= 0.999); beside them, the float model's cosine with 40 dB of noise
added to every layer's output (how sensitive the model is). ``int8-saved``: static int8 eagerly,
saved with ``save_quantized`` and loaded into a freshly built model (outputs equal), and dynamic
int8 (cosine >= 0.99). ``generate`` (causal LMs and
encoder-decoders): greedy ``generate`` of 8 new tokens after a 12-token prompt, stock against
``cpuboost.optimize(model, graph_mode=True)`` (which compiles ``generate``'s forward),
``cpuboost.llm.optimize`` in float32 and ``llm.optimize`` with ``woq_int8``: the same tokens
(float32) and each step's scores within 1e-3 of stock's largest (woq_int8: the scores' cosine
>= 0.99 up to the first differing token). ``trace``: ``torch.jit.freeze(torch.jit.trace(...))``
(keyword inputs, ``strict=False``, no key/value cache) of the stock model and of ``optimize``
fp32, each against the same model run eagerly (max |diff| / max |reference| <= 1e-4), and of
static int8 ``quantize``, whose trace must be as accurate as its eager run (SQNR vs fp32 within
0.5 dB: a traced oneDNN convolution rounds apart from the kernel); an architecture stock
PyTorch cannot trace is reported as such. Vision models whose output vanishes with the config's
initialization get BatchNorm statistics first (``keep_signal``). One line per architecture
(graph and generate: per variant); a summary at the end. Speed is not measured here (tiny
models).
"""
import argparse
import copy
import gc
import time
import traceback
import warnings

import torch

from cpuboost.verify import compare, cosine, sqnr_db  # (cosine: nan where a side is all zeros)

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             n_embd=64, n_layer=2, n_head=4, d_model=64, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
             decoder_ffn_dim=128, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
             num_key_value_heads=2, vocab_size=512, ffn_dim=128, head_dim=16, embedding_size=64,
             n_inner=128, num_decoder_layers=2, max_position_embeddings=128, rotary_dim=8,
             pad_token_id=0, decoder_start_token_id=0, d_inner=128)
TEXT = {
    "bert": "BertModel", "roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForCausalLM",
    "distilbert": "DistilBertForSequenceClassification", "albert": "AlbertModel",
    "electra": "ElectraForMaskedLM", "deberta": "DebertaModel",
    "deberta-v2": "DebertaV2ForSequenceClassification", "mpnet": "MPNetModel",
    "camembert": "CamembertModel", "ernie": "ErnieModel", "megatron-bert": "MegatronBertModel",
    "convbert": "ConvBertModel", "squeezebert": "SqueezeBertModel", "roformer": "RoFormerModel",
    "mobilebert": "MobileBertModel", "xlnet": "XLNetModel", "funnel": "FunnelModel",
    "big_bird": "BigBirdModel", "rembert": "RemBertModel", "nystromformer": "NystromformerModel",
    "longformer": "LongformerForSequenceClassification",
    "gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM", "gptj": "GPTJForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM", "opt": "OPTForCausalLM", "bloom": "BloomForCausalLM",
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "falcon": "FalconForCausalLM",
    "mpt": "MptForCausalLM", "codegen": "CodeGenForCausalLM", "stablelm": "StableLmForCausalLM",
    "olmo": "OlmoForCausalLM", "starcoder2": "Starcoder2ForCausalLM",
    "mixtral": "MixtralForCausalLM", "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
    "pegasus": "PegasusForConditionalGeneration", "marian": "MarianMTModel",
    "mt5": "MT5ForConditionalGeneration", "blenderbot": "BlenderbotForConditionalGeneration",
}
SEQ2SEQ = {"t5", "bart", "mbart", "pegasus", "marian", "mt5", "blenderbot"}
VISION = {
    "vit": "ViTForImageClassification", "deit": "DeiTModel", "beit": "BeitModel",
    "swin": "SwinModel", "convnext": "ConvNextForImageClassification", "resnet": "ResNetModel",
    "regnet": "RegNetModel", "dinov2": "Dinov2Model", "segformer": "SegformerModel",
    "poolformer": "PoolFormerModel", "mobilevit": "MobileViTModel",
    "efficientnet": "EfficientNetModel", "mobilenet_v2": "MobileNetV2Model", "levit": "LevitModel",
    "convnextv2": "ConvNextV2Model",
}
# per-architecture settings a tiny config needs to be valid
EXTRA = {
    "longformer": dict(attention_window=[8, 8]), "big_bird": dict(attention_type="original_full"),
    "funnel": dict(block_sizes=[1, 1], n_head=4, d_head=16),
    "deberta-v2": dict(pooler_hidden_size=64),
    "mobilebert": dict(embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32),
    "mixtral": dict(num_local_experts=4), "xlm-roberta": dict(is_decoder=True),
    "swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
    "vit": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=128, patch_size=8),
}
for _name in ("deit", "beit", "dinov2"):
    EXTRA[_name] = EXTRA["vit"]


def config_for(model_type: str):
    from transformers import AutoConfig
    config = AutoConfig.for_model(model_type)
    if model_type not in VISION:
        for key, value in SMALL.items():
            if hasattr(config, key):
                try:
                    setattr(config, key, value)
                except (AttributeError, NotImplementedError):  # derived or fixed in this config
                    pass
    else:
        config.image_size = 64
    for key, value in EXTRA.get(model_type, {}).items():
        setattr(config, key, value)
    return config


def keep_signal(model, inputs: list) -> None:
    """Set each BatchNorm's running statistics from ``inputs`` (a train-mode forward of them as
    one batch), so that every normalized activation has unit variance. With the configs'
    initializer_range of 0.02 the deep vision nets' activations vanish: MobileNetV2, MobileViT,
    LeViT and EfficientNet output zeros or values below 1e-5, against which no cosine means
    anything. Done only where the output vanished (largest magnitude below 1e-4). EfficientNet
    initializes its BatchNorms' scales to ~0.02 as well (its output stayed below 1e-26 with the
    statistics set): every BatchNorm's affine part is made the identity first."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        if norm.affine:
            with torch.no_grad():
                norm.weight.fill_(1.0)
                norm.bias.zero_()
    model.train()
    with torch.no_grad():  # one batch: BatchNorm1d (LeViT) takes no batch of 1 in training
        model(**{key: torch.cat([kw[key] for kw in inputs]) for key in inputs[0]})
    model.eval()


def inputs_for(model_type: str, seed: int, batch: int = 1, length: int = 24) -> dict:
    """Random inputs; ``length``: the sequence length of text (images stay 64x64: ViT and LeViT
    take no other size)."""
    gen = torch.Generator().manual_seed(seed)
    if model_type in VISION:
        return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=gen)}
    ids = torch.randint(3, 500, (batch, length), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type in SEQ2SEQ:
        out["decoder_input_ids"] = torch.randint(3, 500, (batch, 7), generator=gen)
    return out


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, as optimize's numerics check measures it."""
    return compare(ref, out, rtol=1e-3).max_rel


def graph_row(model, kw, ref) -> list:
    import cpuboost
    rows = []
    for inplace in (False, True):
        work = copy.deepcopy(model) if inplace else model
        t0 = time.perf_counter()
        fast = cpuboost.optimize(work, graph_mode=True, inplace=inplace)
        err = max(rel_diff(first_tensor(fast(**kw)), ref) for _ in range(2))
        record = cpuboost.report_of(fast).pass_named("graph_mode")
        breaks = sum(1 for where, why in record.skipped if why.startswith("graph break"))
        rows.append(f"inplace={inplace}: {'OK' if err <= 1e-3 else 'WRONG'} rel diff {err:.1e}, "
                    f"{breaks} graph break reason(s), {time.perf_counter() - t0:.0f} s")
        del work, fast
        gc.collect()
    return rows


def eager_rows(model, kw, ref, other: dict) -> list:
    """Eager ``cpuboost.optimize``: fp32 with and without ``sample_input`` (then the first call
    runs the passes that need an input), bf16 with it; two calls each against the model's own
    output, a third on ``other`` (another batch and length than the first: packing was shaped
    by the first), and the original model unchanged afterwards."""
    import cpuboost
    rows = []
    other_ref = first_tensor(model(**other))
    for name, options in (("fp32", dict(sample_input=kw)), ("fp32, no sample_input", {}),
                          ("bf16", dict(sample_input=kw, dtype=torch.bfloat16))):
        try:
            t0 = time.perf_counter()
            fast = cpuboost.optimize(model, **options)
            pairs = [(first_tensor(fast(**kw)).float(), ref) for _ in range(2)]
            pairs.append((first_tensor(fast(**other)).float(), other_ref))
            untouched = torch.equal(first_tensor(model(**kw)), ref)
            if name == "bf16":
                cos = min(cosine(o, r) for o, r in pairs)
                ok, what = cos >= 0.99, f"cosine {cos:.5f}"
            else:
                err = max(rel_diff(o, r) for o, r in pairs)
                ok, what = err <= 1e-3, f"rel diff {err:.1e}"
            report = cpuboost.report_of(fast)
            applied = sum(len(r.applied) for r in report.passes if not r.dropped)
            dropped = [r.name for r in report.passes if r.dropped]  # the numerics check's doing
            unchecked = report.numerics is None  # (without sample_input: checked at first call)
            rows.append(f"{name}: {'OK' if ok and untouched and not unchecked else 'CHECK'} "
                        f"{what}{'' if untouched else ', ORIGINAL CHANGED'}, {applied} rewrite(s)"
                        f"{f', DROPPED {dropped}' if dropped else ''}"
                        f"{', NOT CHECKED' if unchecked else ''}, "
                        f"{time.perf_counter() - t0:.1f} s")
            del fast
        except Exception as e:
            traceback.print_exc(limit=4)
            rows.append(f"{name}: ERROR {type(e).__name__}: {str(e)[:300]}")
        gc.collect()
    return rows


def noise_floor(model, kw, ref, db: float = 40.0) -> float:
    """Cosine vs fp32 of the float model with Gaussian noise at ``db`` SQNR added to every
    conv's and linear's output: what int8's per-layer error (~40 dB) does to a model that is
    merely sensitive (BatchNorm-normalized random CNNs amplify it: MobileNetV2 0.898 with noise
    alone, 0.898 in int8)."""
    def noisy(module, args, out):
        return out + torch.randn_like(out) * out.pow(2).mean().sqrt() * 10 ** (-db / 20)
    hooks = [m.register_forward_hook(noisy) for m in model.modules()
             if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))]
    try:
        torch.manual_seed(0)
        return cosine(first_tensor(model(**kw)), ref)
    finally:
        for h in hooks:
            h.remove()


def int8_row(model, kw, ref, model_type) -> list:
    import cpuboost
    calib = [kw] + [inputs_for(model_type, seed) for seed in (2, 3)]
    eager = first_tensor(cpuboost.quantize(model, calib)(**kw))
    graph = cpuboost.quantize(model, calib, graph_mode=True)
    outs = [first_tensor(graph(**kw)) for _ in range(2)]
    ok = (min(cosine(eager, ref), cosine(outs[0], ref)) >= 0.99
          and cosine(outs[0], eager) >= 0.999 and torch.equal(outs[0], outs[1]))
    return [f"{'OK' if ok else 'CHECK'} cosine vs fp32: eager {cosine(eager, ref):.5f}, graph "
            f"{cosine(outs[0], ref):.5f}; graph vs eager {cosine(outs[0], eager):.6f}; 40 dB "
            f"noise per layer {noise_floor(model, kw, ref):.5f}"]


def trace_rows(model, kw, ref, model_type) -> list:
    """torch.jit.trace + freeze (IPEX's deployment flow) of stock, fp32-optimized and int8;
    without a key/value cache (an object the tracer cannot return)."""
    import cpuboost
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # (an input must be a tensor: set, not passed)

    def traced(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.jit.freeze(torch.jit.trace(m, example_kwarg_inputs=kw, strict=False,
                                                 check_trace=False))
        out = t(**kw)
        out = out if isinstance(out, torch.Tensor) else next(iter(out.values())) \
            if isinstance(out, dict) else out[0]
        return first_tensor(m(**kw)).float(), out.float()
    rows = []
    for name, make in (("stock", lambda: model),
                       ("fp32", lambda: cpuboost.optimize(model, sample_input=kw))):
        try:
            err = rel_diff(*reversed(traced(make())))
            rows.append(f"{name}: {'OK' if err <= 1e-4 else 'WRONG'} rel diff {err:.1e}")
        except Exception as e:
            rows.append(f"{name}: {'stock cannot trace it' if name == 'stock' else 'ERROR'} "
                        f"{type(e).__name__}: {_first_line(e)}")
        gc.collect()
    try:  # int8: the traced form rounds apart from the eager kernels; as accurate?
        eager, out = traced(cpuboost.quantize(model, [kw] + [inputs_for(model_type, seed)
                                                          for seed in (2, 3)]))
        s_eager, s_traced = sqnr_db(ref, eager), sqnr_db(ref, out)
        rows.append(f"int8: {'OK' if s_traced >= s_eager - 0.5 else 'WORSE'} SQNR vs fp32 "
                    f"traced {s_traced:.1f} dB, eager {s_eager:.1f} dB")
    except Exception as e:
        rows.append(f"int8: ERROR {type(e).__name__}: {_first_line(e)}")
    return ["; ".join(rows)]


def _first_line(e: Exception) -> str:  # (an output's repr in a message spans many lines)
    return (str(e).splitlines() or [""])[0][:200]


def saved_rows(model, kw, ref, model_type, cls) -> list:
    """Eager int8 without compiling: static, through ``save_quantized`` / ``load_quantized``
    into a freshly built model (outputs must be equal to the quantized model's), and dynamic."""
    import tempfile

    import transformers

    import cpuboost
    calib = [kw] + [inputs_for(model_type, seed) for seed in (2, 3)]
    rows = []
    try:
        q = cpuboost.quantize(model, calib)
        out = first_tensor(q(**kw))
        with tempfile.TemporaryDirectory() as tmp:
            cpuboost.save_quantized(q, tmp)
            loaded = cpuboost.load_quantized(
                lambda: getattr(transformers, cls)(config_for(model_type)), tmp)
            again = first_tensor(loaded(**kw))
        same = torch.equal(out, again)
        rows.append(f"static: {'OK' if same and cosine(out, ref) >= 0.99 else 'CHECK'} "
                    f"cosine {cosine(out, ref):.5f}, saved and loaded "
                    f"{'equal' if same else f'DIFFERS (cosine {cosine(again, out):.6f})'}")
    except Exception as e:
        traceback.print_exc(limit=4)
        rows.append(f"static: ERROR {type(e).__name__}: {str(e)[:300]}")
    try:
        d = cpuboost.quantize(model, config=cpuboost.DynamicInt8Config(), example_inputs=kw)
        cos = cosine(first_tensor(d(**kw)), ref)
        rows.append(f"dynamic: {'OK' if cos >= 0.99 else 'CHECK'} cosine {cos:.5f}")
    except cpuboost.UnsupportedRequestError as e:  # dynamic int8 covers Linears only
        rows.append(f"dynamic: n/a ({str(e)[:60]}...)")
    except Exception as e:
        traceback.print_exc(limit=4)
        rows.append(f"dynamic: ERROR {type(e).__name__}: {str(e)[:300]}")
    return rows


def generate_rows(model, model_type) -> list:
    import cpuboost
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 500, (1, 12), generator=gen)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
              min_new_tokens=8, do_sample=False, num_beams=1, output_scores=True,
              return_dict_in_generate=True)
    if model_type in SEQ2SEQ:  # the tiny configs set it, their generation configs do not
        kw["decoder_start_token_id"] = 0

    def run(m):
        with torch.no_grad():
            out = m.generate(**kw)
        return out.sequences, torch.stack(out.scores).float()

    ref_tokens, ref_scores = run(model)
    variants = [("graph_mode", lambda: cpuboost.optimize(model, graph_mode=True))]
    if model_type not in SEQ2SEQ:
        variants += [("llm fp32", lambda: cpuboost.llm.optimize(model, dtype=torch.float32)),
                     ("llm woq_int8", lambda: cpuboost.llm.optimize(
                         model, dtype=torch.float32, quantization="woq_int8"))]
    rows = []
    for name, build in variants:
        try:
            t0 = time.perf_counter()
            fast = build()
            (tokens, scores), (again, _) = run(fast), run(fast)
            same = torch.equal(tokens, ref_tokens) and torch.equal(tokens, again)
            finite = ref_scores.isfinite() & scores.isfinite()  # -inf: tokens generate forbids
            if name.endswith("woq_int8"):
                # up to the first step whose token differs: after it the two continue
                # different texts (random tiny models have near ties: XLM-R's top two 2e-3 apart)
                steps = (tokens[0, -len(scores):] != ref_tokens[0, -len(scores):]).nonzero()
                upto = int(steps[0]) + 1 if len(steps) else len(scores)
                f = finite[:upto]
                cos = cosine(scores[:upto][f], ref_scores[:upto][f])
                ok = cos >= 0.99
                what = (f"scores cosine {cos:.5f} over the first {upto} step(s), tokens "
                        f"{'same' if same else 'differ'}")
            else:
                err = rel_diff(scores[finite], ref_scores[finite])
                ok = same and err <= 1e-3
                what = f"tokens {'same' if same else 'DIFFER'}, scores rel diff {err:.1e}"
            rows.append(f"{name}: {'OK' if ok else 'CHECK'} {what}, "
                        f"{time.perf_counter() - t0:.0f} s")
            del fast
        except Exception as e:
            traceback.print_exc(limit=4)
            rows.append(f"{name}: ERROR {type(e).__name__}: {str(e)[:300]}")
        torch._dynamo.reset()
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("eager", "graph", "int8", "int8-saved", "generate",
                                           "trace"),
                        required=True)
    parser.add_argument("only", nargs="*", help="model types (default: all)")
    args = parser.parse_args()
    import transformers
    warnings.filterwarnings("ignore")
    summary = []
    for model_type, cls in {**TEXT, **VISION}.items():
        if args.only and model_type not in args.only:
            continue
        if args.mode == "generate" and not (model_type in SEQ2SEQ or cls.endswith("CausalLM")
                                            or cls.endswith("LMHeadModel")):
            continue
        try:
            torch.manual_seed(0)
            model = getattr(transformers, cls)(config_for(model_type)).eval()
            kw = inputs_for(model_type, 1)
            with torch.no_grad():
                ref = first_tensor(model(**kw)).clone()
                stats_set = bool(ref.abs().max() < 1e-4)
                if stats_set:
                    keep_signal(model, [inputs_for(model_type, seed) for seed in range(5, 9)])
                    ref = first_tensor(model(**kw)).clone()
        except Exception as e:  # the tiny config, not cpuboost
            summary.append(f"{model_type}: not built ({type(e).__name__}: {str(e)[:100]})")
            print(summary[-1], flush=True)
            continue
        try:
            with torch.no_grad():
                rows = (graph_row(model, kw, ref) if args.mode == "graph"
                        else eager_rows(model, kw, ref, inputs_for(model_type, 9, 2, 17))
                        if args.mode == "eager"
                        else saved_rows(model, kw, ref, model_type, cls)
                        if args.mode == "int8-saved"
                        else generate_rows(model, model_type) if args.mode == "generate"
                        else trace_rows(model, kw, ref, model_type) if args.mode == "trace"
                        else int8_row(model, kw, ref, model_type))
        except Exception as e:
            traceback.print_exc(limit=4)
            rows = [f"ERROR {type(e).__name__}: {str(e)[:300]}"]
        name = f"{model_type} ({cls}{', BatchNorm statistics set' if stats_set else ''})"
        for row in rows:
            summary.append(f"{name}: {row}")
            print(summary[-1], flush=True)
        torch._dynamo.reset()
        gc.collect()
    print(f"\nSUMMARY ({args.mode}, torch {torch.__version__}, transformers "
          f"{transformers.__version__})")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
