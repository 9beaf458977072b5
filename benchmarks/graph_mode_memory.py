"""RSS of graph mode vs eager: build, run eager, optimize(graph_mode=True, sample_input) under a
5 ms RSS sampler, run once. Usage: python benchmarks/graph_mode_memory.py bert|resnet fp32|bf16"""
import torch, sys, gc, cpuboost
from cpuboost.bench.harness import PeakRss, rss_mb
from cpuboost.bench.zoo import _bert, _resnet50
torch.set_num_threads(2)
build = {"bert": _bert, "resnet": _resnet50}[sys.argv[1]]
m, inp = build(1)
with torch.no_grad():
    m(**inp)
gc.collect(); eager = rss_mb()
dt = torch.bfloat16 if sys.argv[2] == "bf16" else None
with PeakRss() as p:
    om = cpuboost.optimize(m, dtype=dt, graph_mode=True, sample_input=inp)
    with torch.no_grad():
        om(**inp)
gc.collect()
print(sys.argv[1:], "eager RSS %.0f MB, compile peak %.0f MB (%.2fx), after %.0f MB (%.2fx)" % (eager, p.peak, p.peak/eager, rss_mb(), rss_mb()/eager))
