"""Freeing the graphs of a compiled forward that was dropped.

Dynamo keeps each compiled graph in a cache entry on the code object it was traced from, and
frees it when a guarded object dies (its guards hold weak references). Graph mode drops the
guards on the model (a dict-version check replaces them, ``state_watch.py``), so nothing told
Dynamo that a model was gone: its graphs, each holding every packed weight as a constant, stayed
until ``torch._dynamo.reset()`` (which drops every model's graphs). Two things kept them:

* Dynamo keeps every backend it was given (``eval_frame.cached_backends``) until that reset;
  the backend was a bound method of the CompiledForward, which holds the model. The backend is
  now ``BackendRef``, a weak reference to its CompiledForward.
* The cache entries themselves. Each CompiledForward compiles in a region of its own
  (``isolate_recompiles``); ``drop_regions`` invalidates that region's entries on every code
  object Dynamo converted, as Dynamo does itself when a guarded object dies, and is called when
  the CompiledForward is collected (``weakref.finalize``).

Both use Dynamo internals present in torch 2.13; where they are missing nothing is dropped (the
graphs stay until ``torch._dynamo.reset()``, as before).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional


class BackendRef:
    """The backend handed to ``torch.compile``: calls ``owner._backend`` while the owner lives.
    Dynamo holds this object for the life of the process; it must not hold the owner."""

    def __init__(self, owner) -> None:
        self._owner = weakref.ref(owner)

    def __call__(self, gm, example_inputs):
        owner = self._owner()
        if owner is None:  # cannot happen: Dynamo compiles only while the owner's forward runs
            raise RuntimeError("cpuboost graph mode: the compiled forward was dropped")
        return owner._backend(gm, example_inputs)


def region_of(compiled: Callable) -> Optional[int]:
    """The isolate_recompiles region of a ``torch.compile`` result (None: not isolated)."""
    region = getattr(compiled, "_isolate_recompiles_id", None)
    return region if isinstance(region, int) and region >= 0 else None


def drop_regions(regions: list[int], backend: Optional[BackendRef]) -> int:
    """Invalidate every cache entry of ``regions`` and forget ``backend``; returns how many
    entries were dropped. Runs from a finalizer, so it never raises."""
    try:
        from torch._dynamo import convert_frame, eval_frame
        from torch._dynamo.guards import DeletedGuardManagerWrapper
        get = eval_frame._get_cache_entries_for_region
    except (ImportError, AttributeError):
        return 0
    dropped = 0
    try:
        for ref in list(convert_frame.input_codes.seen):
            code = ref()
            if code is None:
                continue
            for region in regions:
                for entry in get(code, region):
                    manager = entry.guard_manager
                    state = getattr(manager, "extra_state", None)
                    if state is None or getattr(manager, "cache_entry", None) is not entry:
                        continue
                    state.invalidate(entry, DeletedGuardManagerWrapper(
                        "cpuboost: the compiled forward that made this graph was dropped"))
                    dropped += 1
        if backend is not None:
            for key, wrapper in list(eval_frame.cached_backends.items()):
                if getattr(wrapper, "compiler_fn", wrapper) is backend:
                    eval_frame.cached_backends.pop(key, None)
    except Exception as e:  # noqa: BLE001 - a finalizer must not raise: say so, keep the graphs
        warnings.warn(f"cpuboost graph mode: a dropped model's compiled graphs could not be freed "
                      f"({type(e).__name__}: {e}); they stay until torch._dynamo.reset()",
                      RuntimeWarning)
    return dropped
