"""BERT-base at the dynamic-length case's lengths (17/45/64/99/128, batch 1): stock eager vs the
graph-mode model (one static graph, then one with the length dynamic) vs a static graph per
length, every variant in one process, per length. Shows where the dynamic-length ratio comes
from and that the dynamic graph costs nothing against per-length static ones.

Usage: python benchmarks/dynamic_vs_static.py   (~3 min on 2 cores)"""
import copy
import statistics
import time

import torch
import torch._inductor.config as inductor_config

import cpuboost
from cpuboost.bench.zoo import CASES
from cpuboost.compile import backend


def main(rounds: int = 5) -> None:
    torch.set_num_threads(2)
    model, cycle = CASES["bert_base_dynamic_lengths"].build()
    items = cycle.items
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        dynamic = cpuboost.optimize(model, sample_input=items[0], graph_mode=True)
        for item in items:
            dynamic(**item)
        torch._dynamo.config.automatic_dynamic_shapes = False  # a graph per length
        torch._dynamo.config.recompile_limit = 64
        with backend.scope():
            static = torch.compile(copy.deepcopy(model), backend="cpuboost", dynamic=False)
            for item in items:
                static(**item)
        times: dict = {}
        for _ in range(rounds):
            for item in items:
                n = item["input_ids"].shape[1]
                for name, run in (("eager", model), ("dynamic", dynamic), ("static", static)):
                    t0 = time.perf_counter()
                    run(**item)
                    times.setdefault((n, name), []).append((time.perf_counter() - t0) * 1e3)
    for item in items:
        n = item["input_ids"].shape[1]
        eager, dyn, stat = (statistics.median(times[(n, k)]) for k in ("eager", "dynamic", "static"))
        print(f"length {n}: eager {eager:.1f} ms, dynamic graph {dyn:.1f} ms ({eager / dyn:.2f}x), "
              f"static graph {stat:.1f} ms ({eager / stat:.2f}x)")


if __name__ == "__main__":
    main()
