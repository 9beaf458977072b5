"""The figures behind ``cpuboost.llm.optimize``'s numerics check (cpuboost/llm/check.py): for
each causal LM family, built from a tiny config with random weights, the SQNR of the result's
logits against the original on the check's probe, in fp32, bf16, woq_int8 and woq_int4 (group
32), read from the report. The floors in ``check.floor_db`` leave wide margins below the lowest
of these. Usage:

    python benchmarks/llm_check_sweep.py [--out benchmarks/results/llm_check_sweep.txt] [gpt2 llama ...]
"""
import argparse
import re
import time
import warnings

import torch

import cpuboost
import cpuboost.llm
from arch_sweep import TEXT, config_for

CAUSAL = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "llama", "mistral", "qwen2",
          "qwen3", "phi", "phi3", "gemma", "gemma2", "falcon", "mpt", "codegen", "stablelm",
          "olmo", "starcoder2", "mixtral", "xlm-roberta"]
MORE = {"cohere": "CohereForCausalLM", "granite": "GraniteForCausalLM",
        "gpt_bigcode": "GPTBigCodeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
        "mamba": "MambaForCausalLM", "rwkv": "RwkvForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM"}
MODES = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
         "int8": dict(dtype=torch.float32, quantization="woq_int8"),
         "int4": dict(dtype=torch.float32,
                      quantization=cpuboost.llm.WoqConfig(bits=4, group_size=32,
                                                          symmetric=False))}


def row(name: str) -> str:
    import transformers
    torch.manual_seed(0)
    model = getattr(transformers, TEXT.get(name) or MORE[name])(config_for(name)).eval()
    cells = []
    for mode, kwargs in MODES.items():
        t0 = time.perf_counter()
        try:
            accuracy = cpuboost.report_of(cpuboost.llm.optimize(model, **kwargs)).accuracy
            found = re.search(r"SQNR (\S+) dB.*same top-1 token at (\S+)", accuracy)
            cells.append(f"{mode} {found.group(1)} dB, top-1 {found.group(2)}" if found
                         else f"{mode} [{accuracy[:80]}]")
        except Exception as e:  # noqa: BLE001 - a row says what failed
            cells.append(f"{mode} ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        cells[-1] += f" ({time.perf_counter() - t0:.1f} s)"
    return f"{name:12s} " + " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("names", nargs="*")
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    lines = [f"llm.optimize numerics check, logits SQNR vs the original (torch {torch.__version__})"]
    print(lines[0], flush=True)
    for name in args.names or CAUSAL + list(MORE):
        lines.append(row(name))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
