"""IPEX's deployment flow on cpuboost models: ``torch.jit.freeze(torch.jit.trace(model, x))``
after ``optimize`` / ``quantize``, against the same models run eagerly and stock eager fp32, all
in one process (alternating rounds, medians). Also stock PyTorch's own traced + frozen model.
What a trace records per kind of layer: docs/optimize.md, "TorchScript".

Usage: python benchmarks/trace_speed.py [--rounds N] [--out FILE]   (~3 min on 2 cores)"""
import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import cpuboost
from cpuboost.bench.zoo import CASES

MODELS = {"BERT-base bs1 s128": "bert_base_bs1_s128", "ResNet-50 bs1": "resnet50_bs1"}


def _traced(model, inputs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers; ours is in the docs
        return torch.jit.freeze(torch.jit.trace(model, example_kwarg_inputs=inputs, strict=False,
                                                check_trace=False))


def measure(case_name: str, rounds: int) -> dict[str, float]:
    case = CASES[case_name]
    model, inputs = case.build()
    with torch.no_grad():
        fp32 = cpuboost.optimize(model, sample_input=inputs)
        int8 = cpuboost.quantize(model, case.calib())
        variants = {"stock eager": model, "cpuboost eager": fp32, "traced + frozen": _traced(fp32, inputs),
                    "cpuboost int8 eager": int8, "int8 traced + frozen": _traced(int8, inputs),
                    "stock traced + frozen": _traced(model, inputs)}
        for run in variants.values():
            for _ in range(3):
                run(**inputs)
        times = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                t0 = time.perf_counter()
                run(**inputs)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [f"torch.jit.trace + freeze of cpuboost models, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{args.rounds} alternating rounds, medians; ratio vs stock eager fp32"]
    for title, name in MODELS.items():
        t = measure(name, args.rounds)
        base = t["stock eager"]
        lines.append(f"{title}: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({base / v:.2f}x)"
                                              for k, v in t.items()))
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
