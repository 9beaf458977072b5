"""Dynamic-length policy for graph mode, measured: one graph with a dynamic length (Dynamo's
automatic dynamic shapes, what cpuboost uses) vs a static graph per length vs static graphs per
bucket (32/64/128; a request is timed at its bucket length, which is what padding it costs). BERT-base bs1, lengths 17/45/64/99/128.
Usage: python benchmarks/dynamic_policy.py dynamic|bucket|static [bf16]   (bf16: the compiled
model runs under CPU autocast; eager stays fp32, the baseline of every ratio)"""
import torch, time, sys
from cpuboost.bench.zoo import _bert
from cpuboost.compile import scope
torch.set_num_threads(2)
model, _ = _bert(1)
lengths = [17, 45, 64, 99, 128]
def inp(L):
    ids = torch.randint(1000, 30000, (1, L), generator=torch.Generator().manual_seed(L))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
def t(f, n=8):
    f(); ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    ts.sort(); return ts[n//2]*1e3
mode = sys.argv[1]
low = sys.argv[2:] == ["bf16"]
torch._dynamo.reset()
c = torch.compile(model, backend="cpuboost", dynamic=False if mode in ("static", "bucket") else None)
res = {}
with torch.no_grad():
    eager = {L: t(lambda: model(**inp(L))) for L in lengths}
    with scope(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        for L in (lengths if mode != "bucket" else [32, 64, 128]):
            c(**inp(L)); c(**inp(L))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        if mode == "bucket":
            b = {L: (32 if L <= 32 else 64 if L <= 64 else 128) for L in lengths}
            run = {L: t(lambda: c(**inp(b[L]))) for L in lengths}
        else:
            run = {L: t(lambda: c(**inp(L))) for L in lengths}
    eager2 = {L: t(lambda: model(**inp(L))) for L in lengths}
e = sum(min(eager[L], eager2[L]) for L in lengths); r = sum(run.values())
print(mode, "bf16" if low else "fp32", "graphs", torch._dynamo.utils.counters["stats"]["unique_graphs"], "avg eager %.1f ms, compiled %.1f ms, %.2fx" % (e/5, r/5, e/r), {L: round(v, 1) for L, v in run.items()})
