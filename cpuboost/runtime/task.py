"""Task: run a module (or any callable) asynchronously on a CPUPool's cores, in a thread of its
own that is bound before its first op. A call returns a future; ``.get()`` waits for the result.

The caller's grad mode, inference mode and CPU autocast state travel with each call (they are
thread-local in torch, so a worker thread would otherwise run with autograd on)."""
from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import Future as _Future

import torch

from cpuboost.errors import ConfigError
from cpuboost.runtime.pool import CPUPool, bind_current_thread, warn_if_openmp_rebinds

_STOP = object()


def _stop(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    """Stop a worker and wait for it to end. Waiting matters: a worker still ending while the
    interpreter shuts down is killed inside torch's C++ frames, which aborts the process
    ("terminate called without an active exception"; seen in half the runs before this)."""
    jobs.put(_STOP)
    if thread is not threading.current_thread():
        thread.join()


class Future(_Future):
    """A concurrent.futures.Future with IPEX's ``get()``."""

    def get(self, timeout: float | None = None):
        return self.result(timeout)


def _modes() -> tuple:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))


def _run_with(modes: tuple, fn, args, kwargs):
    grad, inference, autocast, dtype = modes
    with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
            torch.autocast("cpu", dtype=dtype, enabled=autocast):
        return fn(*args, **kwargs)


def _serve(jobs: queue.SimpleQueue, pool: CPUPool, started: Future) -> None:
    try:
        bind_current_thread(pool)
    except BaseException as e:  # noqa: BLE001 - reported to the creator
        started.set_exception(e)
        return
    started.set_result(None)
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        future, modes, fn, args, kwargs = job
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(_run_with(modes, fn, args, kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's get()
            future.set_exception(e)
        del job, future, args, kwargs  # don't keep inputs alive until the next job


class Task:
    """``Task(module, cpu_pool)``; ``task(*args, **kwargs)`` returns a Future (``.get()``);
    ``task.run_sync(...)`` waits. Calls on one Task run one after another on its pool."""

    def __init__(self, module, cpu_pool: CPUPool):
        if not callable(module):
            raise ConfigError(f"Task needs a module or callable, got {type(module).__name__}")
        if not isinstance(cpu_pool, CPUPool):
            raise ConfigError(f"Task's cpu_pool must be a CPUPool, got {type(cpu_pool).__name__}")
        warn_if_openmp_rebinds()
        self.module = module
        self.cpu_pool = cpu_pool
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        started = Future()
        self._thread = threading.Thread(target=_serve, args=(self._jobs, cpu_pool, started),
                                        name=f"cpuboost-task-{cpu_pool.core_ids}", daemon=True)
        self._thread.start()
        started.get()  # raises if binding failed
        # runs on close(), when the Task is garbage collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, _stop, self._jobs, self._thread)

    def __call__(self, *args, **kwargs) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("this Task was closed; create a new one")
        future = Future()
        self._jobs.put((future, _modes(), self.module, args, kwargs))
        return future

    def run_sync(self, *args, **kwargs):
        return self(*args, **kwargs).get()

    def close(self) -> None:
        """Stop the worker thread after the calls already submitted."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"Task({type(self.module).__name__}, {self.cpu_pool!r})"
