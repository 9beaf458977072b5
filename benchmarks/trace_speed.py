"""IPEX's deployment flow on cpuboost models: ``torch.jit.freeze(torch.jit.trace(model, x))``
after ``optimize`` / ``quantize``, against the same models run eagerly and stock eager fp32, all
in one process (``cpuboost bench``'s harness: alternating rounds, medians, outputs compared
with eager fp32's). Also stock PyTorch's own traced + frozen model. What a trace records per
kind of layer: docs/optimize.md, "TorchScript".

Usage: python benchmarks/trace_speed.py [--rounds N] [--out FILE]   (~5 min on 2 cores)"""
import argparse
import time
import warnings
from pathlib import Path

import torch

import cpuboost
from cpuboost.bench.harness import run_case
from cpuboost.bench.zoo import CASES

MODELS = {"BERT-base bs1 s128": "bert_base_bs1_s128", "ResNet-50 bs1": "resnet50_bs1"}
OURS = ("eager_fp32", "cpuboost_fp32", "cpuboost_int8")


def _traced(model, inputs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from transformers; ours is in the docs
        traced = torch.jit.freeze(torch.jit.trace(model, example_kwarg_inputs=inputs,
                                                  strict=False, check_trace=False))
    return lambda x: tuple(traced(**x).values())  # (the eager model's outputs, in order)


def _peers(case) -> dict:
    """run_case's ``make(model, sample, varying) -> run(inputs)`` for the traced variants."""
    return {"traced_stock": lambda m, sample, _: _traced(m, sample),
            "traced_cpuboost_fp32": lambda m, sample, _: _traced(
                cpuboost.optimize(m, sample_input=sample), sample),
            "traced_cpuboost_int8": lambda m, sample, _: _traced(
                cpuboost.quantize(m, case.calib(), example_inputs=sample), sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [f"torch.jit.trace + freeze of cpuboost models, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"cpuboost bench's harness ({args.rounds} rounds of ~1 s, medians); ratio vs stock "
             "eager fp32; max rel diff of the output vs eager fp32's"]
    for title, name in MODELS.items():
        case = CASES[name]
        peers = _peers(case)
        result = run_case(case, OURS + tuple(peers), rounds=args.rounds, peers=peers)
        lines.append(f"{title}: " + ", ".join(
            f"{r['variant']} {r['median_ms']:.1f} ms ({r['speedup']:.2f}x, diff "
            f"{r['max_rel_diff']:.1e})" for r in result["rows"]))
        print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
