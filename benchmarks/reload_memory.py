"""RSS of a process that loads a model, compiles it with graph mode, serves, drops it and loads
the next version (a server reloading weights), without ``torch._dynamo.reset()``.

    python benchmarks/reload_memory.py [--rounds 3] [--layers 12] [--inplace]

Each round builds a BERT-base (random weights), ``optimize(graph_mode=True)``, two calls, then
``del`` and two ``gc.collect()`` (the first runs the finalizer that drops the graphs, the
second frees them: they sit in reference cycles) and glibc's ``malloc_trim`` (so RSS shows what
was freed rather than what glibc keeps for reuse).
"""
import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _round(layers: int, inplace: bool) -> float:
    import transformers
    import cpuboost
    ids = torch.randint(1000, 30000, (1, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers)).eval()
    fast = cpuboost.optimize(model, graph_mode=True, inplace=inplace)
    with torch.no_grad():
        fast(**inputs)
        fast(**inputs)
    return _rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--inplace", action="store_true")
    args = parser.parse_args()
    from cpuboost._memory import release_freed_memory
    import cpuboost
    print(f"cpuboost from {os.path.dirname(cpuboost.__file__)}; BERT {args.layers} layers, "
          f"inplace={args.inplace}")
    start = _rss_mb()
    for i in range(args.rounds):
        compiled = _round(args.layers, args.inplace)
        gc.collect()
        gc.collect()
        release_freed_memory()
        print(f"round {i + 1}: RSS compiled {compiled:.0f} MB, after dropping {_rss_mb():.0f} MB "
              f"(start {start:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
