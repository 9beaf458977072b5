"""Graph mode on a forward with graph breaks: keep it only if it beats the model's own code.

Between the graphs of a forward with graph breaks, the model's code runs as stock eager (graph
mode turns the eager passes off), and the graphs can come out slower than that code: Inductor
lowers some tensor layouts to scalar index arithmetic (Longformer-base: its sliding-window
attention's pad/view/slice-assign chains became loops with integer divisions per element,
37 ms of each layer against ~28 ms of fills and copies eagerly), so graph mode ran 0.81-0.96x of stock
eager. With a sample input, ``optimize`` times the compiled forward against the model's own
forward on the same weights (no second copy of anything) and, where it is slower by more than
the margin, drops the compiled forward (its graphs are freed: ``dynamo_cache.py``) and applies
the eager passes instead. Forwards without graph breaks are not timed: their single graph was
never measured slower than eager.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Optional

import torch
from torch import nn

from cpuboost._memory import release_freed_memory
from cpuboost.compile.graph_mode import CompiledForward, SubmoduleForward

MARGIN = 1.05  # the machine's noise: within 5% of eager the compiled forward is kept
ROUNDS = 3  # timed calls of each, interleaved, after one untimed call of each


def medians_ms(*calls: Callable[[], object]) -> list[float]:
    """Median wall time of each call, in ms, timed in turns so drift hits all alike."""
    times: list[list[float]] = [[] for _ in calls]
    with torch.no_grad():
        for call in calls:
            call()
        for _ in range(ROUNDS):
            for spent, call in zip(times, calls):
                t0 = time.perf_counter()
                call()
                spent.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] * 1e3 for t in times]


def slower_than_eager(model: nn.Module, call: tuple) -> Optional[str]:
    """Why the compiled forward of ``model`` should give way to the eager passes (it has graph
    breaks and ran slower than the model's own forward on ``call``), else None."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, CompiledForward) or forward.failed or not forward.graph_breaks:
        return None
    args, kwargs = call
    compiled, eager = medians_ms(lambda: model(*args, **kwargs),
                                 lambda: type(model).forward(model, *args, **kwargs))
    verdict = (f"with {forward.graph_breaks} graph break(s) the compiled forward ran "
               f"{compiled:.1f} ms on the sample against {eager:.1f} ms for the model's own "
               f"forward ({eager / compiled:.2f}x)")
    if compiled <= eager * MARGIN:
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
