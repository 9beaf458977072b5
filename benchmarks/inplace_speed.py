"""Graph mode with and without ``inplace=True`` (which releases the weights the graphs hold
packed, compile/release.py), BERT-base batch 1 at 128 and 17 tokens, against stock eager, all
in one process: the per-call cost of the release machinery (a released weight is a plain
Parameter while a call runs, a ReleasedParameter between calls) and that outputs are identical.

Usage: python benchmarks/inplace_speed.py   (~4 min on 2 cores)"""
import statistics
import time

import torch
import torch._inductor.config as inductor_config

import cpuboost
from cpuboost.bench.zoo import CASES


def main(rounds: int = 15) -> None:
    torch.set_num_threads(2)
    models = [CASES["bert_base_bs1_s128"].build() for _ in range(3)]
    (eager, item), (kept, _), (given, _) = models
    short = {k: v[:, :17] for k, v in item.items()}
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        variants = {"eager": eager,
                    "inplace=False": cpuboost.optimize(kept, sample_input=item, graph_mode=True),
                    "inplace=True": cpuboost.optimize(given, sample_input=item, graph_mode=True,
                                                      inplace=True)}
        for x in (item, short, item, short):  # both graphs compiled (the second: dynamic)
            a = variants["inplace=False"](**x).last_hidden_state
            b = variants["inplace=True"](**x).last_hidden_state
        released = sum(p.untyped_storage().nbytes() == 0 for p in given.parameters())
        print(f"outputs identical: {torch.equal(a, b)}; weights released: {released}")
        for x, name in ((item, "128 tokens"), (short, "17 tokens")):
            times = {k: [] for k in variants}
            for _ in range(rounds):
                for k, model in variants.items():
                    t0 = time.perf_counter()
                    model(**x)
                    times[k].append(time.perf_counter() - t0)
            base = statistics.median(times["eager"])
            print(name + ": " + ", ".join(
                f"{k} {statistics.median(v) * 1e3:.1f} ms ({base / statistics.median(v):.2f}x)"
                for k, v in times.items()))


if __name__ == "__main__":
    main()
