"""`cpuboost bench`: the main job. One subprocess per model; in it, every variant is timed
round-robin so speedups are ratios measured in one process."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from cpuboost import _env

RESULTS = Path("benchmarks") / "results"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark cpuboost against stock PyTorch on a model zoo")
    p.add_argument("--quick", action="store_true", help="batch-1 cases, fewer rounds, no compile")
    p.add_argument("--cases", help="comma-separated case names (default: the whole suite)")
    p.add_argument("--model", help="benchmark your model: package.module:factory returning "
                                   "(model, inputs)")
    p.add_argument("--variants", help="comma-separated subset of the variants")
    p.add_argument("--rounds", type=int, help="timing rounds per variant (median is reported)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled variants (stock Inductor and the cpuboost backend)")
    p.add_argument("--llm", action="store_true",
                   help="LLM generation bench (Llama-style ~1B model; small one with --quick)")
    p.add_argument("--runtime", action="store_true",
                   help="multi-stream (MultiStreamModule) and multi-instance (cpuboost run) "
                        "throughput bench")
    p.add_argument("--plot", metavar="OUT.png", help="draw the speedups to this file")
    p.add_argument("--out", help="results directory (default benchmarks/results)")
    p.set_defaults(func=run)
    w = sub.add_parser("bench-worker", help=argparse.SUPPRESS)
    w.add_argument("case")
    w.add_argument("--variants", required=True)
    w.add_argument("--rounds", type=int, required=True)
    w.add_argument("--memory", action="store_true")
    w.add_argument("--llm", metavar="SIZE", help="LLM bench of this model size")
    w.add_argument("--runtime", metavar="FORM", help="multi-stream bench of this model form")
    w.set_defaults(func=worker)


def _case(name: str):
    from cpuboost.bench.zoo import CASES, user_case
    if ":" in name:
        return user_case(name)
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return CASES[name]


def worker(args) -> int:
    if args.runtime:
        from cpuboost.bench import runtime
        print("CPUBOOST_RESULT " + json.dumps(runtime.run_streams(args.case, args.runtime,
                                                                  args.rounds)))
        return 0
    if args.llm:
        from cpuboost.bench import llm
        result = llm.memory_llm(args.llm) if args.memory else llm.run_llm(
            args.llm, args.variants.split(","), args.rounds)
        print("CPUBOOST_RESULT " + json.dumps(result))
        return 0
    from cpuboost.bench.harness import memory_check, run_case
    case = _case(args.case)
    result = memory_check(case) if args.memory else run_case(
        case, tuple(args.variants.split(",")), rounds=args.rounds)
    print("CPUBOOST_RESULT " + json.dumps(result))
    return 0


def _spawn(case: str, variants, rounds: int, memory=False, llm=None, runtime=None) -> dict:
    cmd = [sys.executable, "-m", "cpuboost.cli.main", "bench-worker", case,
           "--variants", ",".join(variants), "--rounds", str(rounds)] + (["--memory"] if memory else [])
    cmd += ["--llm", llm] if llm else []
    cmd += ["--runtime", runtime] if runtime else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("CPUBOOST_RESULT "):
            return json.loads(line[len("CPUBOOST_RESULT "):])
    return {"case": case, "error": f"worker exited with {proc.returncode}", "rows": []}


def _print_table(results: list[dict], memory: list[dict]) -> None:
    print("\nspeedup: vs stock eager fp32 in the same process (median of rounds); setup s: "
          "optimize + first call of each request shape (for compiled variants: the compile "
          "time); peak RSS: process peak while the variant was set up; +setup: what its set-up "
          "added; cos: cosine similarity of the output with eager fp32's (the accuracy proxy for "
          "int8); graphs: "
          "graphs torch.compile built for it (dynamic-length case: over all request lengths)")
    print(f"\n{'case':<26} {'variant':<22} {'median ms':>10} {'speedup':>8} {'setup s':>8} "
          f"{'peak RSS':>9} {'+setup':>7} {'max rel diff':>13} {'cos':>8} {'graphs':>6}")
    for res in results:
        if res.get("error"):
            print(f"{res['case']:<26} ERROR: {res['error']}")
        for r in res["rows"]:
            print(f"{r['case']:<26} {r['variant']:<22} {r['median_ms']:>10.2f} "
                  f"{r['speedup']:>7.2f}x {r['setup_s']:>8.1f} {r['peak_rss_mb']:>8.0f}M "
                  f"{r['setup_added_mb']:>+6.0f}M {r['max_rel_diff']:>13.2e} "
                  f"{r.get('cosine') or float('nan'):>8.5f} {r.get('graphs_compiled', 0):>6}")
    for m in memory:
        if "ratio" in m:
            print(f"memory {m['case']}: eager {m['rss_eager_mb']:.0f} MiB, after "
                  f"optimize {m['rss_optimized_mb']:.0f} MiB ({m['ratio']:.2f}x)")


def _plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'cpuboost[bench]'") from e
    rows = [r for res in results for r in res["rows"]]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ys = [next((r["speedup"] for r in rows if r["case"] == c and r["variant"] == v), 0)
              for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=15)
    ax.set_ylabel("speedup vs stock eager fp32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_llm(args) -> int:
    """The LLM bench: eager variants in one process, stock torch.compile in another (each with
    its own stock baseline), and the optimize-memory check in a third."""
    from cpuboost.bench import llm
    size = "small" if args.quick else "1b"
    variants = args.variants.split(",") if args.variants else list(llm.EAGER + llm.COMPILED)
    rounds = args.rounds or (2 if args.quick else 3)
    groups = [["stock_bf16"] + [v for v in variants if v in llm.EAGER and v != "stock_bf16"]]
    if not (args.quick or args.no_compile) and any(v in llm.COMPILED for v in variants):
        groups.append(["stock_bf16"] + [v for v in variants if v in llm.COMPILED])
    parts = [_spawn(f"llama_{size}", g, rounds, llm=size) for g in groups]
    memory = _spawn(f"llama_{size}", ["cpuboost_woq_int8"], 1, memory=True, llm=size)
    for part in parts[1:]:
        for row in part["rows"]:
            if row["variant"] == "stock_bf16":
                row["variant"] = "stock_bf16 (compile proc)"
    failed = [p for p in parts + [memory] if p.get("error")]
    for part in parts:
        if part["rows"]:
            llm.print_llm(part, memory if part is parts[0] and "peak_ratio" in memory else None)
    _write(args, "llm-", {"results": parts, "memory": memory})
    for p in failed:
        print(f"ERROR in {p['case']}: {p['error']}", file=sys.stderr)
    return 1 if failed else 0


def _write(args, kind: str, payload: dict) -> Path:
    out_dir = Path(args.out or _env.results_dir(str(RESULTS)))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{kind}{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(dict(date=stamp, cpu=_cpu(), **payload), indent=1))
    print(f"\nresults written to {path}")
    return path


def run_runtime(args) -> int:
    """Multi-stream cases each in a process of their own; then multi-instance via cpuboost run."""
    from cpuboost.bench import runtime
    cases = list(runtime.STREAM_CASES)[:2] if args.quick else list(runtime.STREAM_CASES)
    if args.cases:
        cases = args.cases.split(",")
    rounds = args.rounds or (3 if args.quick else 5)
    streams = []
    for i, case in enumerate(cases):
        for form in runtime.forms():
            print(f"[{i + 1}/{len(cases)}] {case} {form}", file=sys.stderr, flush=True)
            res = _spawn(case, ["streams"], rounds, runtime=form)
            res.setdefault("form", form)
            streams.append(res)
    inst_cases = runtime.INSTANCE_CASES[:1] if args.quick else runtime.INSTANCE_CASES
    instances = [runtime.run_instances(c) for c in inst_cases if c in cases or not args.cases]
    runtime.print_runtime(streams, instances)
    _write(args, "runtime-", {"streams": streams, "instances": instances})
    failed = [r for r in streams if r.get("error")] + [
        r for res in instances for r in res["rows"] if r["returncode"] != 0]
    return 1 if failed else 0


def run(args) -> int:
    if args.runtime:
        return run_runtime(args)
    if args.llm:
        return run_llm(args)
    from cpuboost.bench.harness import COMPILED, VARIANTS
    from cpuboost.bench.zoo import CASES
    if args.model:
        cases = [args.model]
    elif args.cases:
        cases = args.cases.split(",")
    else:
        cases = [n for n, c in CASES.items() if c.quick or not args.quick]
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if args.quick or args.no_compile:
        variants = [v for v in variants if v not in COMPILED]
    skipped = [] if args.variants else _emulated_bf16_variants(variants)
    if skipped:
        variants = [v for v in variants if v not in skipped]
        print(f"skipping {', '.join(skipped)}: this CPU has no bf16 instructions, so bf16 is "
              "emulated and several times slower than fp32 (pass --variants to run them)",
              file=sys.stderr, flush=True)
    rounds = args.rounds or (3 if args.quick else 7)
    # Compiled variants run in a process of their own, with its own eager fp32 baseline:
    # measured here, a compiled model in the process slowed eager bf16 autocast by ~30%.
    groups = [["eager_fp32"] + [v for v in variants if v not in COMPILED and v != "eager_fp32"],
              ["eager_fp32"] + [v for v in variants if v in COMPILED]]
    groups = [g for g in groups if len(g) > 1] or groups[:1]
    results, memory = [], []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case}", file=sys.stderr, flush=True)
        rows, errors = [], []
        for g, group in enumerate(groups):
            part = _spawn(case, group, rounds)
            for row in part["rows"]:
                if g > 0 and row["variant"] == "eager_fp32":
                    row["variant"] = "eager_fp32 (compile proc)"
            rows += part["rows"]
            if part.get("error"):
                errors.append(part["error"])
        results.append({"case": case, "rows": rows, "error": "; ".join(errors) or None})
        if not args.quick and not args.model and case.startswith("bert_base_bs1"):
            memory.append(_spawn(case, variants, rounds, memory=True))
    _print_table(results, memory)
    import torch
    import cpuboost
    _write(args, "", {"quick": args.quick, "machine": platform.machine(), "skipped": skipped,
                      "torch": torch.__version__, "cpuboost": cpuboost.__version__,
                      "threads": torch.get_num_threads(), "results": results, "memory": memory})
    if args.plot:
        _plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0 if all(not r.get("error") for r in results) else 1


def _emulated_bf16_variants(variants: list[str]) -> list[str]:
    """The bf16 variants, where this CPU would only emulate bf16 (BERT-base measured 4.8x
    slower than fp32 on AVX2): hours of timing that show nothing a user could want. Where
    cpuboost's bf16 is bf16 weights with float32 arithmetic, only stock autocast emulates."""
    import torch

    from cpuboost.checks import bf16_weights_only
    from cpuboost.hw import detect
    hw = detect()
    if hw.native_bf16:
        return []
    if bf16_weights_only(torch.bfloat16, hw):
        return [v for v in variants if v == "eager_bf16"]
    return [v for v in variants if "bf16" in v]


def _cpu() -> str:
    from cpuboost.hw import detect
    return detect().summary()


__all__ = ["add_parser"]
