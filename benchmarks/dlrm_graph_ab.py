"""DLRM-like model (bs256, bags of 4 and 20), fp32, `graph_mode=True` with and without the
graph pass that puts EmbeddingBags on the forward-only kernel
(``graph_passes.forward_only_embedding_bags``), against stock eager, alternating rounds in one
process (Inductor's graph cache off: a cached graph skips the pass). Usage:

    python benchmarks/dlrm_graph_ab.py [--rounds 30] [--out benchmarks/results/dlrm_graph_ab.txt]
"""
import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config

import cpuboost
from cpuboost.bench import zoo
from cpuboost.compile import graph_passes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    inductor_config.fx_graph_cache = False
    lines = []
    for bag in (4, 20):
        model, inputs = zoo._dlrm(256, bag=bag)
        with torch.no_grad():
            runs = {"eager": model,
                    "graph": cpuboost.optimize(model, graph_mode=True, sample_input=inputs)}
            kept = graph_passes.forward_only_embedding_bags
            graph_passes.forward_only_embedding_bags = lambda graph: 0
            try:
                torch._dynamo.reset()
                runs["graph, full kernel"] = cpuboost.optimize(model, graph_mode=True,
                                                               sample_input=inputs)
            finally:
                graph_passes.forward_only_embedding_bags = kept
            ref = model(**inputs)
            diffs = {k: float((m(**inputs) - ref).abs().max()) for k, m in runs.items()}
            times = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, m in runs.items():
                    t0 = time.perf_counter()
                    for _ in range(20):
                        m(**inputs)
                    times[k].append((time.perf_counter() - t0) / 20 * 1e3)
        eager = statistics.median(times["eager"])
        paired = statistics.median(o / n for o, n in zip(times["graph, full kernel"],
                                                         times["graph"]))
        lines.append(f"bags of {bag}: " + ", ".join(
            f"{k} {statistics.median(v):.3f} ms ({eager / statistics.median(v):.2f}x)"
            for k, v in times.items()) + f"; forward-only vs full, paired: {paired:.3f}x; "
            f"max |diff| vs eager {max(diffs.values()):.1e}")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{args.rounds} alternating rounds of 20 calls, medians\n" + "\n".join(lines)
                    + "\n")


if __name__ == "__main__":
    main()
