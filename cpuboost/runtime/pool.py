"""CPUPool (a set of cores) and pin (run the calling thread's work on a pool's cores).

Works with the GNU OpenMP that torch ships. A thread's OpenMP team inherits the thread's CPU
affinity when the team is created, and ATen's thread count is per thread once a thread has
started; so binding a thread and setting its count before its first parallel region confines
all of its work to the pool, without touching other threads."""
from __future__ import annotations

import os
import warnings

import torch

from cpuboost.errors import ConfigError
from cpuboost.hw.topology import format_cpulist, read_topology

_BIND_VALUES_THAT_REBIND = ("true", "close", "spread", "master", "primary")


class CPUPool:
    """A set of CPU cores. ``core_ids``: logical CPU numbers; ``node_id``: the physical cores of
    one NUMA node; neither: every physical core this process may use (IPEX's semantics)."""

    def __init__(self, core_ids=None, node_id: int | None = None):
        topo = read_topology()
        usable = {c.id for c in topo.usable}
        if core_ids is not None and node_id is not None:
            raise ConfigError("CPUPool takes core_ids or node_id, not both")
        if core_ids is not None:
            ids = [int(c) for c in core_ids]
            if not ids:
                raise ConfigError("CPUPool(core_ids=[]) has no cores; give at least one")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"CPUPool core_ids {ids} lists a core twice")
            bad = sorted(set(ids) - usable)
            if bad:
                raise ConfigError(f"CPUPool core_ids {bad} are not usable by this process "
                                  f"(usable: {format_cpulist(usable)}; offline CPUs and CPUs "
                                  "outside the affinity mask cannot be used)")
        elif node_id is not None:
            if node_id not in topo.nodes:
                raise ConfigError(f"CPUPool(node_id={node_id}): this machine has NUMA node(s) "
                                  f"{list(topo.nodes)}")
            ids = [core[0].id for core in topo.cores(node_id)]
            if not ids:
                raise ConfigError(f"CPUPool(node_id={node_id}): no usable cores on that node")
        else:
            ids = [core[0].id for core in topo.cores()]
        self.core_ids = ids
        self.node_id = node_id

    def __len__(self) -> int:
        return len(self.core_ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, CPUPool) and other.core_ids == self.core_ids

    def __hash__(self) -> int:
        return hash(tuple(self.core_ids))

    def __repr__(self) -> str:
        return f"CPUPool(core_ids=[{format_cpulist(self.core_ids)}])"

    def split(self, parts: int) -> list["CPUPool"]:
        """``parts`` pools of consecutive cores; the first ``len % parts`` get one more."""
        if not 1 <= parts <= len(self):
            raise ConfigError(f"cannot split {self!r} ({len(self)} cores) into {parts} parts; "
                              f"use 1..{len(self)} streams")
        base, extra = divmod(len(self), parts)
        out, start = [], 0
        for i in range(parts):
            end = start + base + (1 if i < extra else 0)
            out.append(CPUPool(self.core_ids[start:end]))
            start = end
        return out


def warn_if_openmp_rebinds() -> None:
    value = os.environ.get("OMP_PROC_BIND", "").strip().lower()
    if value and value.split(",")[0] in _BIND_VALUES_THAT_REBIND:
        warnings.warn(f"OMP_PROC_BIND={os.environ['OMP_PROC_BIND']} makes OpenMP bind its "
                      "threads to its own places, overriding a pool's cores; unset it for "
                      "cpuboost.runtime (`cpuboost run` does not set it)", RuntimeWarning,
                      stacklevel=3)


def bind_current_thread(pool: CPUPool) -> tuple[set[int], int]:
    """Bind the calling thread to the pool with one OpenMP thread per core. Returns what to
    restore. Sets the thread count only for this thread: ATen's default for threads started
    later is put back."""
    saved_mask = os.sched_getaffinity(0)
    saved_threads = torch.get_num_threads()  # also fixes this thread's count before we change it
    default = _default_threads()
    os.sched_setaffinity(0, pool.core_ids)
    torch.set_num_threads(len(pool))
    _set_default_threads(default)
    return saved_mask, saved_threads


def restore_current_thread(saved: tuple[set[int], int]) -> None:
    mask, threads = saved
    default = _default_threads()
    os.sched_setaffinity(0, mask)
    torch.set_num_threads(threads)
    _set_default_threads(default)


# ATen keeps one process-wide "default" count that threads adopt on their first parallel region;
# torch.set_num_threads changes it as well as the calling thread's count. We read it in a fresh
# thread and write it back from one, so binding one thread never changes what others start with.
def _in_fresh_thread(fn):
    import threading
    box = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join()
    return box[0]


def _default_threads() -> int:
    return _in_fresh_thread(torch.get_num_threads)


def _set_default_threads(n: int) -> None:
    _in_fresh_thread(lambda: torch.set_num_threads(n))


class pin:
    """Run the calling thread's torch work on ``cpu_pool``'s cores, as a context manager or a
    decorator. Threads the calling thread had already used for OpenMP keep their old affinity;
    for full isolation run the work in a ``Task``, whose thread is bound before its first op.
    Entering and leaving costs ~0.4 ms here (the process default thread count is read and put
    back from short-lived threads): pin a block of work, not each op."""

    def __init__(self, cpu_pool: CPUPool):
        if not isinstance(cpu_pool, CPUPool):
            raise ConfigError(f"pin() takes a CPUPool, got {type(cpu_pool).__name__}")
        self.cpu_pool = cpu_pool
        self._saved: list = []

    def __enter__(self):
        warn_if_openmp_rebinds()
        self._saved.append(bind_current_thread(self.cpu_pool))
        return self.cpu_pool

    def __exit__(self, *exc) -> None:
        restore_current_thread(self._saved.pop())

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with pin(self.cpu_pool):
                return fn(*args, **kwargs)
        return wrapper
