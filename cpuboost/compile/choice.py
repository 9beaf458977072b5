"""Graph mode on a forward with graph breaks: keep it only if it beats the model's own code.

Between the graphs of a forward with graph breaks, the model's code runs as stock eager (graph
mode turns the eager passes off), and the graphs can come out slower than that code: Inductor
lowers some tensor layouts to scalar index arithmetic (Longformer-base: its sliding-window
attention's pad/view/slice-assign chains became loops with integer divisions per element, 37 ms
of each layer against ~28 ms of fills and copies eagerly), so graph mode ran 0.85-0.96x of
stock eager. With a sample input, ``optimize`` times the compiled forward against the model's
own forward on the same weights (no second copy of anything) and, unless it is faster by the
margin, drops the compiled forward (its graphs are freed: ``dynamo_cache.py``) and applies the
eager passes instead. Forwards without graph breaks are not timed: their single graph was never
measured slower than eager.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch
from torch import nn

from cpuboost._memory import release_freed_memory
from cpuboost.compile.graph_mode import CompiledForward, SubmoduleForward

# The compiled forward is kept only where it beats the model's own forward by 10%: the eager
# passes that replace it usually beat that code too, and closer than that this machine's noise
# decides (Longformer-base, compiled ~10-15% slower by medians: with a 5% margin it was kept in
# 2 of 5 runs, once at 1.08x faster on the sample, then ran 0.85x of stock eager)
MARGIN = 1.10
ROUNDS = 5  # timed calls of each, interleaved, after one untimed call of each


def best_ms(*calls: Callable[[], object]) -> list[float]:
    """Best wall time of each call, in ms, timed in turns. The best, not the median: on a shared
    machine noise only adds time (Longformer-base's stock forward measured 1072-1522 ms in
    different processes here, and a median of 3 chose the slower side)."""
    times: list[list[float]] = [[] for _ in calls]
    with torch.no_grad():
        for call in calls:
            call()
        for _ in range(ROUNDS):
            for spent, call in zip(times, calls):
                t0 = time.perf_counter()
                call()
                spent.append(time.perf_counter() - t0)
    return [min(t) * 1e3 for t in times]


def slower_than_eager(model: nn.Module, call: tuple) -> Optional[str]:
    """Why the compiled forward of ``model`` should give way to the eager passes (it has graph
    breaks and did not beat the model's own forward on ``call`` by MARGIN), else None."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, CompiledForward) or forward.failed or not forward.graph_breaks:
        return None
    args, kwargs = call
    compiled, eager = best_ms(lambda: model(*args, **kwargs),
                              lambda: type(model).forward(model, *args, **kwargs))
    verdict = (f"with {forward.graph_breaks} graph break(s) the compiled forward ran "
               f"{compiled:.1f} ms on the sample against {eager:.1f} ms for the model's own "
               f"forward ({eager / compiled:.2f}x)")
    if compiled * MARGIN <= eager:
        if forward.record is not None:
            forward.record.notes.append(f"{verdict}: kept")
        return None
    return verdict


def drop_compiled(model: nn.Module) -> None:
    """Take the compiled forwards off ``model`` (its own, an encoder's) and free their graphs
    now: the finalizer that drops them runs once they are gone, and a collection frees the
    graphs' reference cycles."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (CompiledForward, SubmoduleForward)):
            del module.__dict__["forward"]
    gc.collect()
    gc.collect()
    release_freed_memory()  # (glibc would keep the freed heap pages in the process's RSS)
