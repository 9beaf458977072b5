"""RSS of a process that loads a model, compiles it with graph mode, serves, drops it and loads
the next version (a server reloading weights), without ``torch._dynamo.reset()``.

    python benchmarks/reload_memory.py [--variant graph|int8_graph|llm_graph|package] [--rounds 3]
                                       [--layers 12] [--inplace]

Each round builds the model (random weights) and compiles it: BERT-base with
``optimize(graph_mode=True)`` (graph) or ``quantize(..., graph_mode=True)`` (int8_graph), or
GPT-2 with ``llm.optimize(dtype=bfloat16, graph_mode=True)`` (llm_graph), or (package) loads
with ``cpuboost.load`` a package exported once from an MLP of 24 1024x1024 Linears (96 MB).
Then two requests (for GPT-2: ``generate`` of 4 tokens), ``del`` and two ``gc.collect()`` (the
first runs the finalizer that drops the graphs, the second frees them: they sit in reference
cycles) and glibc's ``malloc_trim`` (so RSS shows what was freed rather than what glibc keeps
for reuse).
"""
import argparse
import gc
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


_PACKAGE = os.path.join(tempfile.gettempdir(), "cpuboost-reload-memory.cbpk")


def _mlp_package() -> None:
    import cpuboost
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)]).eval()
    cpuboost.export(mlp, (torch.randn(4, 1024),), _PACKAGE)


def _round(variant: str, layers: int, inplace: bool) -> float:
    import transformers as T
    import cpuboost
    if variant == "package":
        loaded = cpuboost.load(_PACKAGE)
        for _ in range(2):
            loaded(torch.randn(4, 1024))
        return _rss_mb()
    ids = torch.randint(1000, 30000, (1, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if variant == "llm_graph":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers)).eval()
        fast = cpuboost.llm.optimize(model, dtype=torch.bfloat16, graph_mode=True,
                                     inplace=inplace)
        with torch.no_grad():
            for _ in range(2):
                fast.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return _rss_mb()
    model = T.BertModel(T.BertConfig(num_hidden_layers=layers)).eval()
    if variant == "int8_graph":
        fast = cpuboost.quantize(model, [inputs], example_inputs=inputs, graph_mode=True,
                                 inplace=inplace)
    else:
        fast = cpuboost.optimize(model, graph_mode=True, inplace=inplace)
    with torch.no_grad():
        fast(**inputs)
        fast(**inputs)
    return _rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("graph", "int8_graph", "llm_graph", "package"),
                        default="graph")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--inplace", action="store_true")
    args = parser.parse_args()
    from cpuboost._memory import release_freed_memory
    import cpuboost
    what = "" if args.variant == "package" else f", {args.layers} layers, inplace={args.inplace}"
    print(f"cpuboost from {os.path.dirname(cpuboost.__file__)}; {args.variant}{what}")
    if args.variant == "package":
        _mlp_package()
        gc.collect()
        release_freed_memory()
    start = _rss_mb()
    for i in range(args.rounds):
        serving = _round(args.variant, args.layers, args.inplace)
        gc.collect()
        gc.collect()
        release_freed_memory()
        print(f"round {i + 1}: RSS serving {serving:.0f} MB, after dropping {_rss_mb():.0f} MB "
              f"(start {start:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
