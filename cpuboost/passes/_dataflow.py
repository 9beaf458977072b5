"""Record what a model actually executes on one real input: which module produced each tensor,
which ops and modules consumed it, and in which module's forward each op ran. Passes decide
from this, so custom methods, Python control flow and models no symbolic tracer can handle are
all fine — whatever ran is what is seen.

Tensors are keyed by (uid, version). A uid is handed out per tensor object and checked through a
weak reference, so a recycled ``id()`` gets a fresh uid without keeping any tensor alive (the
recording costs no more memory than the forward itself). An in-place op (``y += r``) returns the
same object, so it starts a new version: uses after it are not confused with uses before it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# Reads of metadata are not uses of a tensor's values.
_METADATA = {"dim", "size", "__get__", "is_contiguous", "numel", "stride", "__len__",
             "is_floating_point", "data_ptr", "storage_offset", "element_size", "is_complex",
             "__format__", "__repr__", "__hash__", "get_device", "has_names"}

Key = tuple[int, int]  # (uid, version)


@dataclass
class ModuleCall:
    index: int
    name: str
    module: nn.Module
    in_keys: tuple[Key, ...]
    in_shape: Optional[tuple[int, ...]]
    out_key: Optional[Key] = None
    out_ndim: Optional[int] = None

    @property
    def key(self):
        return ("call", self.index)

    @property
    def passthrough(self) -> bool:
        """Returned its input unchanged (nn.Identity, a folded BatchNorm...)."""
        return self.out_key is not None and self.out_key in self.in_keys


@dataclass
class OpCall:
    index: int
    name: str  # e.g. "add", "__iadd__", "relu"
    in_keys: tuple[Key, ...]
    out_key: Optional[Key]
    owner: str  # qualified name of the module whose forward ran it ("" = the root)
    plain_args: bool  # no non-tensor arguments besides the tensors (no alpha=..., out=...)
    in_shapes: tuple = ()  # the tensor arguments' shapes, in order

    @property
    def key(self):
        return ("op", self.index)


@dataclass
class Dataflow:
    calls: list[ModuleCall] = field(default_factory=list)
    ops: list[OpCall] = field(default_factory=list)
    consumers: dict[Key, list] = field(default_factory=dict)  # key -> consumer keys, in order
    absorbed: set = field(default_factory=set)  # indices of calls a pass folded into another

    def calls_of(self, module: nn.Module) -> list[ModuleCall]:
        """The recorded calls of ``module`` that still happen (not absorbed by a rewrite)."""
        return [c for c in self.calls if c.module is module and c.index not in self.absorbed]

    def entity(self, key):
        return self.calls[key[1]] if key[0] == "call" else (self.ops[key[1]] if key[0] == "op" else None)

    def producer(self, key: Key) -> Optional[ModuleCall]:
        """The module call that made this tensor (skipping calls that passed it through)."""
        return next((c for c in self.calls if c.out_key == key and not c.passthrough), None)

    def real_consumers(self, key: Optional[Key]) -> list:
        """Consumer entities of a tensor, ignoring modules that only passed it through."""
        found = []
        for k in dict.fromkeys(self.consumers.get(key, [])) if key is not None else []:
            ent = self.entity(k)
            if isinstance(ent, ModuleCall) and ent.passthrough:
                continue
            found.append(ent if ent is not None else k)
        return found

    def sole_consumer(self, key: Optional[Key]):
        """The module call or op that is the only user of this tensor, if there is exactly one."""
        users = self.real_consumers(key)
        return users[0] if len(users) == 1 and not isinstance(users[0], tuple) else None

    def rebind(self, old: nn.Module, new: nn.Module) -> None:
        """A pass swapped ``old`` for ``new``: calls recorded for one now belong to the other."""
        for c in self.calls:
            if c.module is old:
                c.module = new

    def first_shape(self, module: nn.Module) -> Optional[tuple[int, ...]]:
        calls = self.calls_of(module)
        return calls[0].in_shape if calls else None


class _Recorder(TorchFunctionMode):
    def __init__(self, flow: Dataflow):
        super().__init__()
        self.flow = flow
        self.leaves: list[ModuleCall] = []  # leaf module calls running now
        self.owners: list[str] = []  # every module whose forward is running now
        self.uids: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (ref, uid)
        self.version: dict[int, int] = {}  # uid -> version

    def uid(self, t: torch.Tensor) -> int:
        entry = self.uids.get(id(t))
        if entry is None or entry[0]() is not t:  # new tensor, or a dead one's recycled id
            entry = (weakref.ref(t), len(self.version))
            self.uids[id(t)] = entry
            self.version[entry[1]] = 0
        return entry[1]

    def key(self, t: torch.Tensor) -> Key:
        uid = self.uid(t)
        return (uid, self.version[uid])

    def use(self, tensors, consumer) -> tuple[Key, ...]:
        keys = []
        for t in tensors:
            if isinstance(t, torch.Tensor):
                k = self.key(t)
                self.flow.consumers.setdefault(k, []).append(consumer)
                keys.append(k)
        return tuple(keys)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _METADATA:
            return func(*args, **kwargs)
        index = len(self.flow.ops)
        consumer = self.leaves[-1].key if self.leaves else ("op", index)
        leaves = tree_leaves((args, kwargs))
        in_keys = self.use(leaves, consumer)
        result = func(*args, **kwargs)
        out_key = None
        if isinstance(result, torch.Tensor):
            if any(result is t for t in leaves):  # in place: a new version of the same object
                self.version[self.uid(result)] += 1
            out_key = self.key(result)
        plain = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        shapes = tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))
        self.flow.ops.append(OpCall(index, name, in_keys, out_key,
                                    self.owners[-1] if self.owners else "", plain, shapes))
        return result

    def pre_hook(self, name, leaf):
        def hook(module, args, kwargs):
            self.owners.append(name)
            if not leaf:
                return
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            call = ModuleCall(len(self.flow.calls), name, module,
                              tuple(self.key(t) for t in tensors),
                              tuple(tensors[0].shape) if tensors else None)
            self.flow.calls.append(call)
            self.leaves.append(call)
        return hook

    def post_hook(self, leaf):
        def hook(module, args, kwargs, output):
            self.owners.pop()
            if not leaf:
                return
            call = self.leaves.pop()
            if isinstance(output, torch.Tensor):
                call.out_key, call.out_ndim = self.key(output), output.dim()
        return hook


class Recording:
    """Record while the model runs: ``start()``, call the model, ``stop(output)``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flow = Dataflow()
        self._rec = _Recorder(self.flow)
        self._handles: list = []

    def start(self) -> None:
        seen = set()
        for name, m in self.model.named_modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            leaf = next(m.children(), None) is None
            self._handles.append(
                m.register_forward_pre_hook(self._rec.pre_hook(name, leaf), with_kwargs=True))
            self._handles.append(m.register_forward_hook(
                self._rec.post_hook(leaf), with_kwargs=True, always_call=True))
        self._rec.__enter__()

    def stop(self, output: Any = None) -> Dataflow:
        self._rec.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rec.use(tree_leaves(output), ("output",))  # returned tensors escape: a use
        self._rec.uids.clear()
        return self.flow


def record(model: nn.Module, run: Callable[[], Any]) -> tuple[Dataflow, Any]:
    """Run ``run()`` (which calls the model) once, recording dataflow."""
    rec = Recording(model)
    rec.start()
    out = None
    try:
        with torch.no_grad():
            out = run()
    finally:
        rec.stop(out)
    return rec.flow, out
