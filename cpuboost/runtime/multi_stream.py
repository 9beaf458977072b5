"""MultiStreamModule: one model, several streams, each a Task on its own cores. A call's batch is
cut into one part per stream, the parts run at the same time, and the outputs are joined.

Why it can be faster than one stream on all cores: each stream's OpenMP team only synchronises
with itself, small GEMMs that scale badly over many threads run single-team, and one stream's
Python overhead overlaps with another's kernels (torch ops release the GIL)."""
from __future__ import annotations

import math
import os
import statistics
import time

import torch
from torch import nn

from cpuboost.errors import ConfigError
from cpuboost.runtime.pool import CPUPool
from cpuboost.runtime.split import MultiStreamModuleHint, make_joiner, make_splitter
from cpuboost.runtime.task import Task

CORES_PER_STREAM_AUTO = 4
AUTO_TRIALS = 3  # timed calls per candidate (after one untimed) before "AUTO" decides


def auto_streams(cores: int) -> int:
    """The multi-stream candidate of "AUTO": one stream per core up to 4 cores, then one per 4
    cores (IPEX's rule for large machines)."""
    return cores if cores <= CORES_PER_STREAM_AUTO else math.ceil(cores / CORES_PER_STREAM_AUTO)


def signature(args, kwargs) -> tuple:
    """Shapes and dtypes of every tensor in a call: calls with equal signatures cost the same."""
    out = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), v.dtype))
        elif isinstance(v, dict):
            for k in v:
                out.append(k)
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            out.append(len(v))
            for x in v:
                walk(x)
    walk(args)
    walk(kwargs)
    return tuple(out)


class _Chooser:
    """"AUTO": for each input signature, time the first calls alternately with one stream on the
    whole pool and with the multi-stream candidate, then keep the faster. Multi-stream loses
    where a model's Python overhead dominates (threads contend for the GIL); this never lets it
    be slower than one stream by more than the measurement noise."""

    def __init__(self, candidates: tuple[int, ...]):
        self.candidates = candidates
        self.timings: dict[tuple, dict[int, list[float]]] = {}
        self.choice: dict[tuple, int] = {}

    def next(self, sig) -> int:
        if sig in self.choice:
            return self.choice[sig]
        seen = self.timings.setdefault(sig, {c: [] for c in self.candidates})
        return min(self.candidates, key=lambda c: len(seen[c]))

    def record(self, sig, streams: int, seconds: float) -> None:
        seen = self.timings.get(sig)
        if seen is None or sig in self.choice:
            return
        seen[streams].append(seconds)
        if all(len(v) > AUTO_TRIALS for v in seen.values()):
            # the first call of each candidate warms caches and threads: not counted
            self.choice[sig] = min(self.candidates,
                                   key=lambda c: (statistics.median(seen[c][1:]), c))


class MultiStreamModule(nn.Module):
    """IPEX's ``MultiStreamModule(model, num_streams="AUTO", cpu_pool=CPUPool(),
    concat_output=True, input_split_hint=MultiStreamModuleHint(0),
    output_concat_hint=MultiStreamModuleHint(0))``.

    ``input_split_hint`` may also be a function ``(args, kwargs, streams) -> [(args, kwargs)]``
    (e.g. ``embedding_bag_split(...)``) and ``output_concat_hint`` a function ``(outputs) ->
    output``. With ``concat_output=False`` the call returns the list of stream outputs. A batch
    smaller than the number of streams uses only as many streams as it has rows."""

    def __init__(self, model, num_streams="AUTO", cpu_pool: CPUPool | None = None,
                 concat_output: bool = True, input_split_hint=MultiStreamModuleHint(0),
                 output_concat_hint=MultiStreamModuleHint(0)):
        super().__init__()
        pool = cpu_pool if cpu_pool is not None else CPUPool()
        if not isinstance(pool, CPUPool):
            raise ConfigError(f"cpu_pool must be a CPUPool, got {type(pool).__name__}")
        auto = num_streams == "AUTO"
        if auto:
            num_streams = auto_streams(len(pool))
        if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
            raise ConfigError(f"num_streams must be a positive int or \"AUTO\", got "
                              f"{num_streams!r}")
        if num_streams > len(pool):
            raise ConfigError(f"num_streams={num_streams} is more than the {len(pool)} cores of "
                              f"{pool!r}; each stream needs at least one core")
        self.model = model
        self.num_streams = num_streams
        self.cpu_pool = pool
        self.concat_output = concat_output
        self._split = make_splitter(input_split_hint)
        self._join = make_joiner(output_concat_hint)
        self.tasks = [Task(model, p) for p in pool.split(num_streams)]
        self._whole = None  # one stream on the whole pool, made when first needed
        self._chooser = _Chooser((1, num_streams)) if auto and num_streams > 1 else None

    @property
    def stream_choice(self) -> dict:
        """With "AUTO": input signature -> streams chosen (after the trial calls)."""
        return dict(self._chooser.choice) if self._chooser else {}

    def forward(self, *args, **kwargs):
        if self._chooser is None:
            return self._run(self.tasks, args, kwargs)
        sig = signature(args, kwargs)
        streams = self._chooser.next(sig)
        start = time.perf_counter()
        out = self._run(self.tasks if streams > 1 else [self._one_stream()], args, kwargs)
        self._chooser.record(sig, streams, time.perf_counter() - start)
        return out

    def _one_stream(self):
        """The caller itself when it already runs on exactly the pool with one thread per core
        (no hand-off, and no second OpenMP team competing with the caller's), else a Task."""
        if (set(self.cpu_pool.core_ids) == os.sched_getaffinity(0)
                and torch.get_num_threads() == len(self.cpu_pool)):
            return None
        if self._whole is None:
            self._whole = Task(self.model, self.cpu_pool)
        return self._whole

    def _run(self, tasks: list, args, kwargs):
        if len(tasks) == 1:  # the whole batch on one stream: nothing to split or join
            out = self.model(*args, **kwargs) if tasks[0] is None else \
                tasks[0](*args, **kwargs).get()
            return out if self.concat_output else [out]
        parts = self._split(args, kwargs, len(tasks))
        if not 1 <= len(parts) <= len(tasks):
            raise ConfigError(f"the split function returned {len(parts)} parts for "
                              f"{len(tasks)} streams")
        futures = [task(*a, **k) for task, (a, k) in zip(tasks, parts)]
        outputs = [f.get() for f in futures]
        return self._join(outputs) if self.concat_output else outputs

    def close(self) -> None:
        for t in self.tasks + ([self._whole] if self._whole else []):
            t.close()

    def extra_repr(self) -> str:
        return f"num_streams={self.num_streams}, cpu_pool={self.cpu_pool!r}"
