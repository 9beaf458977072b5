"""Graph mode on a forward with graph breaks, with a sample input: kept, or dropped for the
eager passes where it runs slower than the model's own forward (cpuboost/compile/choice.py).

    python benchmarks/graph_break_choice.py [--rounds 7]

Longformer-base (random weights), 512 tokens, sequence classification: prints the choice and
its two times from the report, then stock eager against the returned model, timed in turns in
this one process.
"""
import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import transformers as T
    import cpuboost
    torch.manual_seed(0)
    model = T.LongformerForSequenceClassification(T.LongformerConfig(  # longformer-base
        vocab_size=50265, max_position_embeddings=4098, attention_window=512, type_vocab_size=1,
        pad_token_id=1)).eval()
    ids = torch.randint(1000, 30000, (1, 512), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    t0 = time.perf_counter()
    fast = cpuboost.optimize(model, graph_mode=True, sample_input=inputs)
    graph = cpuboost.report_of(fast).pass_named("graph_mode")
    print(f"optimize(graph_mode=True, sample_input=...): {time.perf_counter() - t0:.1f} s")
    print("graph_mode:", f"DROPPED - {graph.dropped}" if graph.dropped else
          next((n for n in graph.notes if "graph break(s) the compiled" in n), "kept"))
    times = {"stock eager": [], "optimize result": []}
    with torch.no_grad():
        model(**inputs)
        fast(**inputs)
        for _ in range(args.rounds):
            for name, m in (("stock eager", model), ("optimize result", fast)):
                t0 = time.perf_counter()
                m(**inputs)
                times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"{name:16s} {ms:8.1f} ms  {med['stock eager'] / ms:.2f}x")


if __name__ == "__main__":
    main()
