"""T5-base generate() (summarization setting: beam search) in graph mode, its encoder compiled
or not, against eager fp32, one process. generate() runs the encoder module on its own, once
per request; graph mode compiles it beside forward (the decoder steps). Two graph-mode results
of the one model (each a shell sharing its modules): in one the encoder's compiled forward is
removed before the first call (so the encoder runs eagerly, as before session 17), timed in
rounds with eager and the full one. (Switching it off and on in one result would change the
encoder's instance dict, which graph mode watches: it would recompile.)

Usage: python benchmarks/t5_generate.py [INPUT_TOKENS=256] [--rounds N]"""
import argparse
import statistics
import time

import torch


def main():
    import transformers as T
    import cpuboost
    ap = argparse.ArgumentParser()
    ap.add_argument("tokens", nargs="?", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config.from_dict(dict(  # t5-base's shapes
        d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))).eval()
    ids = torch.randint(1000, 30000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
               min_new_tokens=16, num_beams=4, do_sample=False)

    def timed(m):
        t0 = time.perf_counter()
        out = m.generate(**gen)
        return time.perf_counter() - t0, out

    with torch.no_grad():
        timed(model)
        ref = timed(model)[1]
        without = cpuboost.optimize(model, graph_mode=True)
        del without.encoder.__dict__["forward"]
        timed(without)
        fast = cpuboost.optimize(model, graph_mode=True)
        setup, out = timed(fast)
        same = torch.equal(out, ref)
        compiled_encoder = fast.encoder.__dict__["forward"]
        variants = {"eager": model, "graph, encoder eager": without, "graph": fast}
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, m in variants.items():
                t, out = timed(m)
                times[k].append(t)
                same &= torch.equal(out, ref)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"T5-base generate, {args.tokens} input tokens, 16 new, 4 beams, fp32, "
          f"{args.rounds} rounds (medians); first call (compiles) {setup:.1f} s; "
          f"tokens equal to eager: {same}; encoder graphs: {compiled_encoder.compiled.graphs}")
    for k, v in med.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms  {med['eager'] / v:.2f}x")


if __name__ == "__main__":
    main()
