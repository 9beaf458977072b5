"""The model's state checked by dict versions, in place of Dynamo's per-attribute guards on it.

Dynamo guards every attribute the traced forward read from the model: module types, flags like
``training``, the ``_modules``/``_parameters`` dicts, each parameter's identity, empty hook dicts.
Evaluated before every call, they cost ResNet-50 560 us (4401 guards) and BERT-base 620 us
(3274 guards) per call: 2-3% of a bf16 or int8 forward at batch 1.

Every one of those values is read from a dict: an instance's ``__dict__``, ``_modules``,
``_parameters``, a hook dict, a config object's ``__dict__``, or a class dict. CPython gives each
dict a version that changes whenever an entry of it is set to another object or removed (the
same version Dynamo's own DICT_VERSION guards read). So graph mode drops Dynamo's guards whose
source is the model (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``) and, in their
place, records the version of every dict those guards read from, the type of every object they
read, and the items of every list; one comparison of those before each call (~60 us for
BERT-base) tells whether anything the graph was traced from has changed since. Guards on values
this cannot watch (a set, an object without a ``__dict__``) are kept, and so are Dynamo's tensor
guards (a tensor attribute can be resized in place). Out of reach: what freezing already ignores
(a weight changed in place) and torch's own classes (see ``_torchs``).

Only frames whose modules are the model itself drop guards. Dynamo caches graphs per code
object: after a graph break inside a layer, that layer's ``forward`` compiles as its own frame,
and its next call may come from another layer of the same class. Dynamo's guards on that frame's
module tell the layers apart; the dicts watched for the first one do not, so its graph (with
its weights frozen in) served every layer: Longformer's logits were off by 0.27 with two layers.
A frame with any module in a local other than the root model keeps all its guards.
"""
from __future__ import annotations

import enum
import functools
import gc
import re
import types
import weakref

import torch

# Values that cannot change in place: a guard on one is covered by watching the dict it is in.
_FIXED = (bool, int, float, complex, str, bytes, type(None), tuple, frozenset, torch.Tensor,
          type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
          types.ModuleType, property, enum.Enum, torch.dtype, torch.device)


@functools.cache
def dict_version():
    """CPython's per-dict version through Dynamo's accessor, or None where it is missing or
    does not change on a write (then Dynamo's own guards stay)."""
    try:
        from torch._C._dynamo.guards import dict_version as version
    except ImportError:
        return None
    if not hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):
        return None
    probe = {}
    before = version(probe)
    probe["changed"] = True
    return version if version(probe) != before else None


def _class_dict(cls: type):
    """The dict behind ``cls.__dict__`` (a read-only proxy of it)."""
    found = gc.get_referents(cls.__dict__)
    return found[0] if len(found) == 1 and type(found[0]) is dict else None


def _torchs(cls: type) -> bool:
    """torch's own classes (and ``object``): Dynamo patches ``nn.Module``'s dict and restores it
    while it compiles, so its version moves with every compile in the process, any model's."""
    module = getattr(cls, "__module__", None) or ""
    return cls is object or module == "torch" or module.startswith("torch.")


# a guard on a frame's local itself, not on an attribute of one: ``self`` (torch 2.13 names
# sources so) or ``L['self']`` (how older Dynamo printed them)
_LOCAL = re.compile(r"[A-Za-z_]\w*|L\['[A-Za-z_]\w*'\]")


class ModelState:
    """The dicts, lists and object types that the dropped guards read, with their state when
    each graph was traced (recorded in the guard filter, before the call's side effects), for
    frames whose modules belong to ``root`` only."""

    def __init__(self, root: torch.nn.Module):
        self._root = weakref.ref(root)
        self._seen: set[int] = set()
        self._empty: tuple = ()  # hook dicts that must stay empty (cheaper than a version)
        # (dicts, their versions, lists, their items' ids, objects, their types): replaced
        # whole, so a call on another thread never sees half of a compile's additions
        self._state: tuple = ((),) * 6

    def filter(self, entries) -> list[bool]:
        """Dynamo's guard filter: drop the guards on the model that a watched dict covers."""
        entries = list(entries)
        if self._another_modules_frame(entries):
            return [True] * len(entries)
        found = ([], [], [], [])  # dicts, lists, objects, empty hook dicts
        keep = []
        for entry, kept in zip(entries, torch.compiler.skip_guard_on_all_nn_modules_unsafe(
                entries)):
            if not kept and entry.guard_type == "EMPTY_NN_MODULE_HOOKS_DICT":
                self._add(found[3], entry.value)
            elif not kept and entry.guard_type != "TENSOR_MATCH":  # (a tensor can be resized)
                kept = not (entry.has_value and self._watch(entry.value, found))
            keep.append(kept)
        dicts, lists, objects, empty = found
        d, v, li, ids, o, t = self._state
        self._state = (d + tuple(dicts), v + tuple(map(dict_version(), dicts)),
                       li + tuple(lists), ids + tuple(tuple(map(id, x)) for x in lists),
                       o + tuple(objects), t + tuple(map(type, objects)))
        self._empty += tuple(empty)
        return keep

    def _another_modules_frame(self, entries) -> bool:
        """Whether a local of the frame (``self`` of a layer's forward, a loop's ``layer``) is a
        module other than the root model: the frame may run again for another module."""
        root = self._root()
        return any(e.has_value and isinstance(e.value, torch.nn.Module) and e.value is not root
                   and _LOCAL.fullmatch(e.name) for e in entries)

    def _add(self, into: list, value) -> None:
        if id(value) not in self._seen:
            self._seen.add(id(value))
            into.append(value)

    def _watch(self, value, found) -> bool:
        dicts, lists, objects, _ = found
        if isinstance(value, _FIXED):
            return True
        if isinstance(value, list):
            self._add(lists, value)
            return True
        if isinstance(value, dict):  # any dict subclass is versioned too
            self._add(dicts, value)
            return True
        state = getattr(value, "__dict__", None)
        if type(state) is not dict:
            return False
        classes = [_class_dict(c) for c in type(value).__mro__ if not _torchs(c)]
        if any(d is None for d in classes):
            return False
        self._add(objects, value)
        for d in [state, *classes]:
            self._add(dicts, d)
        return True

    def changed(self) -> bool:
        """Whether anything watched differs from when the graphs were traced (~50 us for the
        2700 dicts, objects and hook dicts of a ResNet-50)."""
        dicts, versions, lists, ids, objects, types_ = self._state
        return (any(self._empty) or tuple(map(dict_version(), dicts)) != versions
                or tuple(map(type, objects)) != types_
                or tuple(tuple(map(id, x)) for x in lists) != ids)

    def __len__(self):
        return len(self._state[0]) + len(self._state[2]) + len(self._state[4]) + len(
            self._empty)
