"""Time one benchmark case: every variant in this one process, round-robin, medians."""
from __future__ import annotations

import copy
import gc
import statistics
import sys
import threading
import time
from typing import Callable

import psutil
import torch
from torch import nn

import cpuboost
from cpuboost._memory import release_freed_memory
from cpuboost.bench.zoo import Cycle, Generate
from cpuboost.verify import compare, cosine

VARIANTS = ("eager_fp32", "cpuboost_fp32", "eager_bf16", "cpuboost_bf16", "cpuboost_int8",
            "cpuboost_int8_dynamic", "cpuboost_llm_bf16", "cpuboost_llm_woq_int8",
            "compile_fp32", "cpuboost_compile_fp32", "cpuboost_compile_bf16",
            "cpuboost_compile_int8", "cpuboost_llm_compile_bf16")
COMPILED = ("compile_fp32", "cpuboost_compile_fp32", "cpuboost_compile_bf16",
            "cpuboost_compile_int8", "cpuboost_llm_compile_bf16")
INT8 = ("cpuboost_int8", "cpuboost_int8_dynamic", "cpuboost_compile_int8")
LLM = ("cpuboost_llm_bf16", "cpuboost_llm_woq_int8",  # cpuboost.llm.optimize: generation
       "cpuboost_llm_compile_bf16")


def call(model, inputs):
    if isinstance(inputs, Cycle):
        inputs = inputs.take()
    if isinstance(inputs, Generate):
        return model.generate(**inputs.kwargs)
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class PeakRss:
    """Highest RSS seen while the block runs (sampled every 5 ms in a thread). Used around
    set-up only, so the sampler never runs during timing."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def _int8(name: str, model, sample, case) -> nn.Module:
    """Static int8 calibrated on the case's calibration inputs (not the timed ones), or
    dynamic int8; the compiled variant is static int8 with graph_mode."""
    if name == "cpuboost_int8_dynamic":
        return cpuboost.quantize(model, config=cpuboost.DynamicInt8Config(),
                                 example_inputs=sample)
    calib = case.calib() if case.calib is not None else [sample]
    return cpuboost.quantize(model, calib, example_inputs=sample,
                             graph_mode=name == "cpuboost_compile_int8")


def _variant(name: str, model, inputs, case, peers=None) -> Callable[[], object]:
    if isinstance(inputs, Cycle):  # each variant walks the same sequence of requests
        sample, inputs = inputs.first(), inputs.fresh()
    else:
        sample = inputs.forward_inputs if isinstance(inputs, Generate) else inputs
    if peers and name in peers:  # another library: make(model, sample, varying) -> run(inputs)
        varying = isinstance(inputs, Cycle)
        runner = peers[name](model, sample, varying)
        return lambda: runner(inputs.take() if varying else inputs)
    if name == "eager_fp32":
        return lambda: call(model, inputs)
    if name == "eager_bf16":
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call(model, inputs)
        return run
    if name in ("cpuboost_fp32", "cpuboost_bf16"):
        dtype = torch.bfloat16 if name.endswith("bf16") else None
        opt = cpuboost.optimize(model, dtype=dtype, sample_input=sample)
        return lambda: call(opt, inputs)
    if name == "compile_fp32":
        if isinstance(inputs, Generate):  # generate() calls the instance's forward: compile that
            compiled = copy.copy(model)
            compiled.forward = torch.compile(model.forward)
        else:
            compiled = torch.compile(model)

        def run():
            with torch._inductor.config.patch(freezing=True):
                return call(compiled, inputs)
        return run
    if name in INT8:
        q = _int8(name, model, sample, case)
        return _calling(q, inputs)
    if name in LLM:
        fast = cpuboost.llm.optimize(model, dtype=torch.bfloat16,
                                     quantization="woq_int8" if name.endswith("int8") else None,
                                     graph_mode="compile" in name)
        return lambda: call(fast, inputs)
    if name in ("cpuboost_compile_fp32", "cpuboost_compile_bf16"):
        dtype = torch.bfloat16 if name.endswith("bf16") else None
        opt = cpuboost.optimize(model, dtype=dtype, graph_mode=True, sample_input=sample)
        return _calling(opt, inputs)
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")


def _calling(model, inputs) -> Callable[[], object]:
    def run():
        return call(model, inputs)
    run.model = model  # its compiled forward counts its own graphs (see _graphs_of)
    return run


def _graphs_of(fn, counted: int) -> int:
    """Graphs a cpuboost graph-mode variant compiled, from its compiled forward's own count:
    Dynamo's process-wide counter misses recompilations of code another variant compiled."""
    own = getattr(getattr(getattr(fn, "model", None), "forward", None), "graphs", None)
    return own if isinstance(own, int) else counted


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 if it never ran)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo else 0


def _progress(case: str, done: int, total: int, text: str) -> None:
    filled = int(24 * done / max(total, 1))
    bar = "#" * filled + "." * (24 - filled)
    print(f"\r[{case}] [{bar}] {done}/{total} {text:<28}", end="", file=sys.stderr, flush=True)


def run_case(case, variants=VARIANTS, rounds: int = 7, round_s: float = 1.0,
             peers=None) -> dict:
    """``peers`` maps extra variant names to ``make(model, sample, varying) -> run(inputs)``
    (``varying``: the requests change shape), for libraries outside cpuboost's dependencies
    (benchmarks/peers.py)."""
    variants = [v for v in variants
                if (case.int8 or v not in INT8) and (case.llm or v not in LLM)]
    model, inputs = case.build()
    fns, setup_s, rss, outputs, compiles = {}, {}, {}, {}, {}
    total, done = len(variants) * (rounds + 1), 0
    with torch.no_grad():
        for name in variants:
            _progress(case.name, done, total, f"set-up {name}")
            done += 1
            t0 = time.perf_counter()
            graphs_before = _compiled_graphs()
            with PeakRss() as mem:
                fn = _variant(name, model, inputs, case, peers)
                outputs[name] = fn()  # first call: includes compilation / deferred work
                for _ in range(len(inputs.items) if isinstance(inputs, Cycle) else 1):
                    fn()  # see every request shape once before timing (compiles happen here)
            compiles[name] = _graphs_of(fn, _compiled_graphs() - graphs_before)
            setup_s[name] = time.perf_counter() - t0
            fns[name], rss[name] = fn, (mem.peak, mem.peak - mem.start)
        # the set-ups (compiles above all) leave garbage in reference cycles: collected now,
        # Python's next full collection (~0.5 s) would land in some variant's round
        gc.collect()
        iters = {}
        for name, fn in fns.items():  # iterations per round from one timed call
            t0 = time.perf_counter()
            fn()
            iters[name] = max(1, int(round_s / max(time.perf_counter() - t0, 1e-6)))
        times = {name: [] for name in fns}
        for r in range(rounds):
            for name, fn in fns.items():
                _progress(case.name, done, total, f"round {r + 1} {name}")
                done += 1
                t0 = time.perf_counter()
                for _ in range(iters[name]):
                    fn()
                times[name].append((time.perf_counter() - t0) / iters[name] * 1e3)
    _progress(case.name, done, total, "done")
    print(file=sys.stderr)
    base = statistics.median(times["eager_fp32"]) if "eager_fp32" in times else None
    rows = []
    for name in fns:
        med = statistics.median(times[name])
        ref = outputs.get("eager_fp32")
        diff = compare(ref, outputs[name], 1.0) if ref is not None else None
        rows.append({"case": case.name, "variant": name, "median_ms": med,
                     "speedup": base / med if base else None, "setup_s": setup_s[name],
                     "peak_rss_mb": rss[name][0], "setup_added_mb": rss[name][1],
                     "max_rel_diff": diff.max_rel if diff else None,
                     "cosine": cosine(ref, outputs[name]) if ref is not None else None,
                     "graphs_compiled": compiles[name],
                     "times_ms": times[name]})
    return {"case": case.name, "rows": rows, "threads": torch.get_num_threads()}


def memory_check(case) -> dict:
    """RSS of the running eager model vs. after `model = cpuboost.optimize(model)`, fresh
    process expected (the caller runs this in its own subprocess)."""
    model, inputs = case.build()
    with torch.no_grad():
        call(model, inputs)
    gc.collect()
    release_freed_memory()
    before = rss_mb()
    model = cpuboost.optimize(model, sample_input=inputs)
    gc.collect()
    release_freed_memory()
    with torch.no_grad():
        call(model, inputs)
    after = rss_mb()
    return {"case": case.name, "rss_eager_mb": before, "rss_optimized_mb": after,
            "ratio": after / before}


__all__ = ["INT8", "LLM", "VARIANTS", "call", "memory_check", "run_case"]
