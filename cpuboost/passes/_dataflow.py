"""Record what a model actually executes on one real input: which leaf module produced each
tensor and who consumed it. Passes decide from this, so custom methods, Python control flow
and models no symbolic tracer can handle are all fine — whatever ran is what is seen."""
from __future__ import annotations

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


@dataclass
class ModuleCall:
    index: int
    name: str
    module: nn.Module
    in_ids: tuple[int, ...]
    in_shape: Optional[tuple[int, ...]]
    out_id: Optional[int] = None
    out_ndim: Optional[int] = None

    @property
    def key(self):
        return ("call", self.index)


@dataclass
class Dataflow:
    calls: list[ModuleCall] = field(default_factory=list)
    consumers: dict[int, set] = field(default_factory=dict)  # tensor id -> consumer keys

    def calls_of(self, module: nn.Module) -> list[ModuleCall]:
        return [c for c in self.calls if c.module is module]

    def producer(self, tensor_id: int) -> Optional[ModuleCall]:
        return next((c for c in self.calls if c.out_id == tensor_id), None)

    def sole_consumer(self, tensor_id: Optional[int]) -> Optional[ModuleCall]:
        """The module call that is the only user of this tensor, if there is exactly one."""
        users = self.consumers.get(tensor_id, set()) if tensor_id is not None else set()
        if len(users) != 1:
            return None
        (key,) = users
        return self.calls[key[1]] if key[0] == "call" else None

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
        self.active: list[ModuleCall] = []
        self.alive: list[torch.Tensor] = []  # keeps ids unique while recording
        self.op_count = 0

    def use(self, tensors, key) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.alive.append(t)
                self.flow.consumers.setdefault(id(t), set()).add(key)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _METADATA:
            self.op_count += 1
            key = self.active[-1].key if self.active else ("op", self.op_count)
            self.use(tree_leaves((args, kwargs)), key)
        return func(*args, **kwargs)

    def pre_hook(self, name):
        def hook(module, args, kwargs):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            call = ModuleCall(len(self.flow.calls), name, module, tuple(id(t) for t in tensors),
                              tuple(tensors[0].shape) if tensors else None)
            self.alive.extend(tensors)
            self.flow.calls.append(call)
            self.active.append(call)
        return hook

    def post_hook(self, module, args, kwargs, output):
        call = self.active.pop()
        if isinstance(output, torch.Tensor):
            self.alive.append(output)
            call.out_id, call.out_ndim = id(output), output.dim()


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
            if next(m.children(), None) is None and id(m) not in seen:  # leaf modules
                seen.add(id(m))
                self._handles.append(
                    m.register_forward_pre_hook(self._rec.pre_hook(name), with_kwargs=True))
                self._handles.append(m.register_forward_hook(
                    self._rec.post_hook, with_kwargs=True, always_call=True))
        self._rec.__enter__()

    def stop(self, output: Any = None) -> Dataflow:
        self._rec.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._rec.use(tree_leaves(output), ("output",))  # returned tensors escape: a use
        self._rec.alive.clear()
        return self.flow


def record(model: nn.Module, run: Callable[[], Any]) -> tuple[Dataflow, Any]:
    """Run ``run()`` (which calls the model) once, recording dataflow between leaf modules."""
    rec = Recording(model)
    rec.start()
    out = None
    try:
        with torch.no_grad():
            out = run()
    finally:
        rec.stop(out)
    return rec.flow, out
