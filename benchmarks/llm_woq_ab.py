"""GPT-2 generate (32 tokens): stock eager fp32 vs llm.optimize bf16 (bf16 weights on AVX2-only CPUs) vs woq_int8,
timed alternately in one process. Usage: python benchmarks/llm_woq_ab.py"""
import torch, time, statistics, cpuboost, sys
from cpuboost.bench.zoo import CASES
from cpuboost.bench.harness import call
torch.set_num_threads(2)
model, x = CASES["gpt2_generate_32"].build()
with torch.no_grad():
    v = {"eager": model,
         "bf16w": cpuboost.llm.optimize(model),
         "woq_int8": cpuboost.llm.optimize(model, quantization="woq_int8")}
    rep = cpuboost.report_of(v["woq_int8"])
    print(rep.dtype, rep.applied("linears"), rep.warnings)
    ref = call(model, x)
    for k in ("bf16w", "woq_int8"):
        out = call(v[k], x)
        print(k, "tokens equal to eager:", torch.equal(out, ref) if isinstance(out, torch.Tensor) else out)
    ts = {k: [] for k in v}
    for r in range(3):
        for k, m in v.items():
            t = time.perf_counter(); call(m, x); ts[k].append(time.perf_counter() - t)
    e = statistics.median(ts["eager"])
    for k in ts:
        print(k, "%.0f ms %.2fx" % (statistics.median(ts[k]) * 1e3, e / statistics.median(ts[k])))
