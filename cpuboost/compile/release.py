"""``optimize(..., graph_mode=True, inplace=True)``: each weight once, in the graph's packed form.

Graph mode changes no module: freezing turns the weights into graph constants, and a Linear's
weight becomes a packed copy for cpuboost's AVX2 kernel (panels of 16 output features), while
the module keeps the original. So every packed weight was held twice (BERT-base fp32: 1.58x the
eager process's RSS), also after ``model = optimize(model, ...)``, since the result shares the
caller's modules. With ``inplace=True`` the caller gives the model away, and after a call that
compiled, each weight that the graphs read only through its packed copy is released (its
storage resized to 0; the Parameter, its shape and the module tree stay).

The packed panels hold exactly the weight's values (and are held here, so they outlive the
graphs, e.g. ``torch._dynamo.reset()``): nothing is lost. Before Dynamo compiles again (a new
input shape), the released weights are unpacked back into their storage and the new graph
reuses the packed constants (``shared_constants.pin`` keeps their recipe key across the
restore), then they are released again.

Code outside the compiled graphs may still read a weight: a submodule called on its own (an
encoder-decoder's encoder, which ``generate()`` calls, is compiled too and shares this release),
a user prints one, ``model.to(...)``. Between calls a released weight is
therefore a ``ReleasedParameter``, whose metadata (shape, dtype...) answers as before and whose
first read of values restores every weight of the model for good (with a warning and a report
note), then proceeds: such a model runs as with ``inplace=False``, never on freed memory.
Copies need no restore: ``detach()`` (what ``state_dict()`` takes), ``copy.deepcopy`` and
pickling (``torch.save(model)``) get the values unpacked into a new tensor. During a call of the
compiled forward a released weight is a plain Parameter (Dynamo's tensor guards check the
type). A compiler failure (forward falls back to eager) restores the weights as a read does.

Not released: a weight any graph also reads as it is (a head tied to an embedding, a bias,
LayerNorm), whose storage another tensor shares, or of a model whose forward has graph breaks
(code between graphs runs eagerly); bf16 or oneDNN-packed copies (they do not give back the
float32 values exactly).
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from cpuboost._memory import release_freed_memory
from cpuboost.compile.shared_constants import folded_constants, pin, read_as_is

_PACK = "cpuboost.pack_linear_weight.default"


def unpack_panels(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of ``cpuboost::pack_linear_weight`` for float32: [P, K, 16] -> [N, K]."""
    panels, k, width = packed.shape
    # (P, K, 16) -> (P, 16, K) -> (P*16, K), the zero padding in N dropped
    return packed.permute(0, 2, 1).reshape(panels * width, k)[:out_features]


def _as_packed_from(param: torch.Tensor, packed: torch.Tensor):
    """Whether ``packed`` holds exactly ``param``: as it is ([N, K], nn.Linear's layout) or
    transposed ([K, N], as GPT-2's Conv1D holds it). Returns ``transposed`` or None."""
    k = packed.shape[1]
    for transposed, n in ((False, param.shape[0] if param.shape[1] == k else None),
                          (True, param.shape[1] if param.shape[0] == k else None)):
        if n is not None and n <= packed.shape[0] * packed.shape[2]:
            values = unpack_panels(packed, n)
            if torch.equal(values.t() if transposed else values, param):
                return transposed
    return None


# what a released weight still answers: its metadata (properties and methods that read no values)
_METADATA = frozenset({
    "shape", "dtype", "device", "layout", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim",
    "names", "is_sparse", "is_quantized", "is_meta", "is_cpu", "is_cuda", "is_mkldnn",
    "is_nested", "output_nr", "_version", "itemsize", "nbytes", "size", "numel", "nelement",
    "dim", "ndimension", "element_size", "stride", "storage_offset", "is_contiguous",
    "untyped_storage", "data_ptr", "is_floating_point", "is_complex", "get_device", "__hash__",
    "__len__", "__format__"})


# id(released weight) -> (weakref to it, weakref to its WeightRelease)
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class ReleasedParameter(nn.Parameter):
    """A weight graph mode released: its storage is empty, the compiled graphs hold it packed.
    Its metadata answers; the first read of its values brings the model's weights back."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        what = f"{name}()"
        if name == "__get__":  # a property: its descriptor has the name
            name = getattr(getattr(func, "__self__", None), "__name__", name)
            what = f".{name}"
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name == "detach":  # state_dict() takes each weight so: the values, as a new tensor
            values = _unpacked(args[0])
            if values is not None:
                return values
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, ReleasedParameter):
                _bring_back(t, what)
        return func(*args, **kwargs)  # on the restored Parameters

    # copies and pickles are plain Parameters holding the values
    def __deepcopy__(self, memo):
        values = _unpacked(self)
        if values is None:
            return self.__deepcopy__(memo)  # (now a plain Parameter)
        memo[id(self)] = copied = nn.Parameter(values, self.requires_grad)
        return copied

    def __reduce_ex__(self, protocol):
        values = _unpacked(self)
        if values is None:
            return self.__reduce_ex__(protocol)
        return torch._utils._rebuild_parameter, (values, self.requires_grad, OrderedDict())


def _owner(t: ReleasedParameter):
    """The WeightRelease that released ``t``; None for a stray object of the class (made from
    one, e.g. by ``type(p)(...)``), which then becomes a plain Parameter."""
    ref, owner = _OWNERS.get(id(t), (None, None))
    owner = owner() if ref is not None and ref() is t else None
    if owner is None:
        t.__class__ = nn.Parameter
    return owner


def _unpacked(t) -> Optional[torch.Tensor]:
    """A released weight's values in a new tensor, or None (not a released weight)."""
    owner = _owner(t) if isinstance(t, ReleasedParameter) else None
    return None if owner is None else owner.values_of(t)


def _bring_back(t: ReleasedParameter, what: str) -> None:
    """A released weight is read: restore every weight of its model for good."""
    owner = _owner(t)
    if owner is None:
        return
    owner.stop(f"{what} read a weight outside the compiled graphs (shape {tuple(t.shape)}): "
               "the weights were restored, memory is as with inplace=False", warn=True)


@dataclass
class _Entry:
    param: weakref.ref
    packed: torch.Tensor  # held: the weight's only copy, whatever becomes of the graphs
    nbytes: int
    transposed: bool  # the weight is [K, N] (Conv1D), the panels [N/16, K, 16]

    def values(self) -> torch.Tensor:
        """The weight's values, unpacked from the graph's copy, in the weight's layout."""
        param = self.param()
        n = param.shape[1] if self.transposed else param.shape[0]
        values = unpack_panels(self.packed, n)
        return values.t() if self.transposed else values


class WeightRelease:
    """The weights of one graph-mode forward that live only as packed graph constants."""

    def __init__(self, model: nn.Module, on_stop: Optional[Callable[[str], None]] = None):
        self.model = weakref.ref(model)
        self.on_stop = on_stop  # told why, when the weights are restored for good
        self.entries: list[_Entry] = []
        self.released = False
        self.pending = False  # restored for a compile since the last release
        self.active = 0  # compiles in progress (on any thread)
        self.calls = 0  # calls in progress: while any runs, released weights are Parameters
        self.stopped = ""  # why weights are kept from now on ("" while releasing)
        self._lock = threading.RLock()

    def stop(self, why: str, warn: bool = False) -> None:
        """Restore the weights for good (a read outside the graphs, eager fallback, graph
        breaks)."""
        with self._lock:
            self._restore()
            if self.stopped:
                return
            self.stopped = why
        if self.on_stop is not None:
            self.on_stop(why)
        if warn:
            warnings.warn(f"cpuboost graph_mode (inplace=True): {why}. See "
                          "cpuboost.report_of(model).", RuntimeWarning, stacklevel=4)

    def values_of(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """A released weight's values, unpacked into a new tensor (None if not released)."""
        with self._lock:
            entry = next((e for e in self.entries if e.param() is param), None) \
                if self.released else None
            return None if entry is None else entry.values().clone()

    def enter(self) -> None:
        """A call of the compiled forward starts: Dynamo's guards expect Parameters."""
        with self._lock:
            self.calls += 1
            if self.calls == 1 and self.released:
                self._set_class(nn.Parameter)

    def exit(self) -> None:
        """The call ended: while no call runs, a released weight is a ReleasedParameter."""
        with self._lock:
            self.calls -= 1
            if self.calls == 0 and self.released:
                self._set_class(ReleasedParameter)

    def _set_class(self, cls) -> None:
        for e in self.entries:
            param = e.param()
            if param is not None:
                param.__class__ = cls

    @contextlib.contextmanager
    def compiling(self):
        """While Dynamo compiles: the weights back in their storage (tracing and freezing read
        them); released again by the call's end (``release``)."""
        with self._lock:
            self._restore()
            self.active += 1
            self.pending = True
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def release(self) -> int:
        """After a call that compiled: free every weight the graphs read only packed, unless
        another thread is compiling (its call releases them). Returns how many are released."""
        with self._lock:
            if self.stopped or self.active:
                return 0
            self.pending = False
            self._restore()  # a new graph may have changed which weights qualify
            self.entries = self._candidates()
            for e in self.entries:
                param = e.param()
                if not param.untyped_storage().resizable():
                    # torch.load's storages (read from the file) cannot be resized: the weight
                    # gets a storage of its own (not written: no memory taken), freed below
                    param.data = torch.empty(param.shape, dtype=param.dtype)
                param.untyped_storage().resize_(0)
                _OWNERS[id(param)] = (e.param, weakref.ref(self))
            self.released = bool(self.entries)
        if self.released:
            # freed weights below glibc's mmap threshold stay in the heap's RSS otherwise (and
            # a recompilation's restore would take fresh pages beside them)
            release_freed_memory()
        return len(self.entries)

    def _restore(self) -> None:
        if not self.released:
            return
        self._set_class(nn.Parameter)
        for e in self.entries:
            param = e.param()
            if param is None:
                continue
            param.untyped_storage().resize_(e.nbytes)
            with torch.no_grad():
                param.copy_(e.values())
            pin(param)  # same values: the recipes folded from it still apply
            _OWNERS.pop(id(param), None)
        self.released = False

    def _candidates(self) -> list[_Entry]:
        model = self.model()
        if model is None:
            return []
        tensors = list(model.parameters()) + list(model.buffers())
        owners: dict[int, int] = {}
        for t in tensors:
            if t.layout == torch.strided and t.numel():
                ptr = t.untyped_storage().data_ptr()
                owners[ptr] = owners.get(ptr, 0) + 1
        params = {id(p): p for p in model.parameters()}
        out = []
        for source, packed, op in folded_constants():
            param = params.get(id(source))
            if param is None or op != _PACK or type(param) is not nn.Parameter or \
                    param.dim() != 2 or not _owns_storage(param) or \
                    packed.dtype != torch.float32 or param.dtype != torch.float32:
                continue
            ptr = param.untyped_storage().data_ptr()
            if owners.get(ptr, 0) != 1 or read_as_is(param) or \
                    any(e.param() is param for e in out):
                continue
            transposed = _as_packed_from(param, packed)
            if transposed is None:
                continue  # changed since it was packed: the graph's copy is not this weight
            pin(param)
            out.append(_Entry(weakref.ref(param), packed,
                              param.untyped_storage().nbytes(), transposed))
        return out

    def released_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries) if self.released else 0


def _owns_storage(t: torch.Tensor) -> bool:
    """``t`` is its storage, whole and contiguous (resizing the storage touches nothing else)."""
    return t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()
