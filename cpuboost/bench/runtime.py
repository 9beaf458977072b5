"""`cpuboost bench --runtime`: throughput of MultiStreamModule against one stream on all cores
(same process, round-robin), and of `cpuboost run` with one instance per core against one
instance on all cores (separate processes, timed over the same wall-clock window)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

STREAM_CASES = {  # name -> (builder, batch); the quick suite takes the first two
    "resnet50_bs2": ("resnet", 2), "dlrm_bs256": ("dlrm", 256), "resnet50_bs4": ("resnet", 4),
    "resnet50_bs8": ("resnet", 8), "resnet50_bs16": ("resnet", 16),
    "bert_base_bs8": ("bert", 8), "dlrm_bs2048": ("dlrm", 2048)}
INSTANCE_CASES = ("resnet50_bs2", "dlrm_bs256", "bert_base_bs8")
FORMS = ("eager_fp32", "cpuboost_bf16", "cpuboost_fp32")  # stock model; cpuboost.optimize()


def forms() -> tuple[str, str]:
    """The stock model and cpuboost's: in bf16 where the CPU has bf16 instructions, else fp32
    (emulated bf16 runs several times slower than fp32 and would measure nothing useful)."""
    from cpuboost.hw import detect
    return ("eager_fp32", "cpuboost_bf16" if detect().native_bf16 else "cpuboost_fp32")


def build(case: str, form: str):
    from cpuboost.bench import zoo
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; known: {FORMS}")
    kind, batch = STREAM_CASES[case]
    model, inputs = {"resnet": zoo._resnet50, "bert": zoo._bert, "dlrm": zoo._dlrm}[kind](batch)
    if form.startswith("cpuboost_"):
        import cpuboost
        dtype = torch.bfloat16 if form == "cpuboost_bf16" else None
        model = cpuboost.optimize(model, dtype=dtype, sample_input=inputs)
    return model, inputs, batch, kind


def _split_hint(kind: str):
    from cpuboost.runtime import MultiStreamModuleHint, embedding_bag_split
    return embedding_bag_split("indices", "offsets") if kind == "dlrm" \
        else MultiStreamModuleHint(0)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def run_streams(case: str, form: str, rounds: int, round_s: float = 1.0) -> dict:
    """One stream on every core (the model called directly) vs MultiStreamModule with one stream
    per core and with "AUTO", timed round-robin in this process."""
    from cpuboost.runtime import CPUPool, MultiStreamModule
    model, inputs, batch, kind = build(case, form)
    cores = len(CPUPool())
    streams = MultiStreamModule(model, num_streams=cores, input_split_hint=_split_hint(kind))
    auto = MultiStreamModule(model, num_streams="AUTO", input_split_hint=_split_hint(kind))
    fns = {"one_stream": lambda: model(**inputs), f"{cores}_streams": lambda: streams(**inputs),
           "auto": lambda: auto(**inputs)}
    with torch.no_grad():
        ref = _first_tensor(model(**inputs)).float()
        diff = {k: (_first_tensor(f()).float() - ref).abs().max().item() for k, f in fns.items()}
        for f in fns.values():  # warm-up (and AUTO's trial calls)
            for _ in range(8 if f is fns["auto"] else 2):
                f()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < round_s or n < 2:
                    f()
                    n += 1
                times[k].append((time.perf_counter() - start) / n)
    base = statistics.median(times["one_stream"])
    rows = [{"case": case, "form": form, "variant": k, "median_ms": statistics.median(v) * 1e3,
             "samples_per_s": batch / statistics.median(v),
             "ratio": base / statistics.median(v), "max_abs_diff": diff[k]}
            for k, v in times.items()]
    return {"case": case, "form": form, "cores": cores, "rows": rows,
            "auto_choice": [v for v in auto.stream_choice.values()]}


def instance_main(argv=None) -> int:
    """One instance of the multi-instance bench (started by `cpuboost run`): build, warm up,
    wait for the common start time, count samples for ``duration`` seconds."""
    p = argparse.ArgumentParser()
    p.add_argument("case")
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    a = p.parse_args(argv)
    model, inputs, batch, _ = build(a.case, "eager_fp32")
    with torch.no_grad():
        for _ in range(2):
            model(**inputs)
        late = time.time() > a.start_at
        time.sleep(max(0.0, a.start_at - time.time()))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < a.duration:
            model(**inputs)
            n += 1
        elapsed = time.perf_counter() - start
    print("CPUBOOST_INSTANCE " + json.dumps({
        "instance": os.environ.get("CPUBOOST_INSTANCE"), "threads": torch.get_num_threads(),
        "samples_per_s": n * batch / elapsed, "late_start": late}), flush=True)
    return 0


def run_instances(case: str, setup_s: float = 30.0, duration: float = 15.0) -> dict:
    """`cpuboost run` with one instance on every core vs one instance per core, each with the
    default allocator and with what `--memory-allocator auto` picks (jemalloc, tcmalloc, or
    glibc's malloc set to keep freed memory). Ratios are against one instance with the default
    allocator."""
    from cpuboost.hw.topology import read_topology
    cores = len(read_topology().cores())  # what `cpuboost run` plans on: physical cores
    allocators = ["default", "auto"]
    rows = []
    for n in (1, cores):
        for allocator in allocators:
            start_at = time.time() + setup_s
            cmd = [sys.executable, "-m", "cpuboost.cli.main", "run", "--ninstances", str(n),
                   "--memory-allocator", allocator, "-m", "cpuboost.bench.runtime", "instance",
                   case, "--start-at", str(start_at), "--duration", str(duration)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = [json.loads(line.split("CPUBOOST_INSTANCE ", 1)[1])
                   for line in proc.stdout.splitlines() if "CPUBOOST_INSTANCE " in line]
            used = next((line.split("allocator: ")[1].split(";")[0]
                         for line in proc.stderr.splitlines() if "allocator: " in line), "?")
            rows.append({"case": case, "instances": n, "allocator": used,
                         "returncode": proc.returncode, "per_instance": got,
                         "samples_per_s": sum(g["samples_per_s"] for g in got),
                         "late_start": any(g["late_start"] for g in got)})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["ratio"] = r["samples_per_s"] / base if base else float("nan")
    return {"case": case, "rows": rows}


def print_runtime(streams: list[dict], instances: list[dict]) -> None:
    print("\nMultiStreamModule (one process; ratio = throughput vs the model called directly on "
          "all cores; AUTO picks per input shape by timing its first calls)")
    print(f"{'case':<16} {'form':<14} {'variant':<11} {'ms/batch':>9} {'samples/s':>10} "
          f"{'ratio':>6} {'max |diff|':>10}")
    for res in streams:
        if res.get("error"):
            print(f"{res['case']:<16} {res.get('form', ''):<14} ERROR: {res['error']}")
            continue
        for r in res["rows"]:
            print(f"{r['case']:<16} {r['form']:<14} {r['variant']:<11} {r['median_ms']:>9.2f} "
                  f"{r['samples_per_s']:>10.1f} {r['ratio']:>5.2f}x {r['max_abs_diff']:>10.2e}")
        print(f"{'':<16} {'':<14} AUTO chose {res['auto_choice']} stream(s)")
    print("\n`cpuboost run` instances (separate processes timed over the same 15 s window; "
          "stock eager fp32; ratio vs 1 instance with the default allocator)")
    for res in instances:
        for r in res["rows"]:
            print(f"{res['case']:<16} {r['instances']} instance(s), allocator "
                  f"{r['allocator']:<9} {r['samples_per_s']:>10.1f} samples/s {r['ratio']:>5.2f}x"
                  f"{'  LATE START' if r['late_start'] else ''}"
                  f"{'  FAILED' if r['returncode'] else ''}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["instance"]:
        return instance_main(argv[1:])
    raise SystemExit("usage: python -m cpuboost.bench.runtime instance CASE --start-at T "
                     "--duration S")


if __name__ == "__main__":
    sys.exit(main())
