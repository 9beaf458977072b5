"""cpuboost.export speed: ResNet-50 bs1 and BERT-base bs1 packages (fp32, bf16; dynamic batch) vs
eager fp32 in the same process. Writes packages to a temporary directory. Usage: python benchmarks/export_speed.py"""
import os, tempfile, time
import torch, cpuboost
OUT = tempfile.mkdtemp(prefix="cpuboost-export-speed-")
from cpuboost.bench.zoo import _resnet50, _bert
torch.set_num_threads(2)
def t(f, n=20):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    ts.sort(); return ts[n//2]*1e3
for name, build in [("resnet50_bs1", _resnet50), ("bert_bs1", _bert)]:
    m, inp = build(1)
    pk = {}
    for dt in (None, torch.bfloat16):
        s = time.time()
        p = cpuboost.export(m, inp, os.path.join(OUT, f"{name}_{dt}.cbpk"), dtype=dt)
        pk[dt] = cpuboost.load(p)
        print(name, dt, "export s", round(time.time()-s, 1), pk[dt].metadata["verified"], flush=True)
    with torch.no_grad():
        e = [t(lambda: m(**inp)) for _ in range(3)]
        a = [t(lambda: pk[None](**inp)) for _ in range(3)]
        b = [t(lambda: pk[torch.bfloat16](**inp)) for _ in range(3)]
    e, a, b = sorted(e)[1], sorted(a)[1], sorted(b)[1]
    print(name, "eager %.1f ms, package fp32 %.1f ms (%.2fx), bf16 %.1f ms (%.2fx)" % (e, a, e/a, b, e/b), flush=True)
