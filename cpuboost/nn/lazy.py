"""``.weight`` of a module that holds its weight in another form, made only when its values are
used.

Models read their layers' ``.weight`` for its dtype far more often than for its values:
transformers' T5 checks ``self.wo.weight.dtype`` three times in every feed-forward call, Mamba
casts to ``lm_head.weight.dtype``. Rebuilding the dense weight on every read made a
cpuboost-optimized T5-base 0.70x of eager (48 rebuilds per forward, 2.4 ms each for a
3072x768 weight). A ``LazyWeight`` answers dtype, shape, device and ``isinstance(w,
torch.Tensor)`` from its metadata (a wrapper tensor subclass: no storage) and builds the dense
tensor the first time an op reads its values; every op then runs on that plain tensor and
returns plain tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map


class LazyWeight(torch.Tensor):
    @staticmethod
    def __new__(cls, shape, dtype: torch.dtype, make: Callable[[], torch.Tensor]):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype,
                                                device=torch.device("cpu"))
        t._make, t._dense = make, None
        return t

    def materialize(self) -> torch.Tensor:
        """The dense tensor (built once per LazyWeight; writing to it changes nothing held)."""
        if self._dense is None:
            self._dense = self._make()
        return self._dense

    # results are plain tensors: no subclass wrapping at the Python level
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(a):
            return a.materialize() if isinstance(a, LazyWeight) else a
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))

    # what reads memory without an op (a subclass has none of its own to offer)
    def tolist(self):
        return self.materialize().tolist()

    def numpy(self, *, force: bool = False):
        return self.materialize().numpy(force=force)

    def __array__(self, dtype=None, copy=None):
        return self.materialize().numpy().astype(dtype) if dtype else self.materialize().numpy()

    def data_ptr(self) -> int:
        return self.materialize().data_ptr()

    def untyped_storage(self):
        return self.materialize().untyped_storage()

    def __repr__(self, *, tensor_contents=None) -> str:
        return repr(self.materialize())

    def __reduce_ex__(self, protocol):  # pickles as the plain tensor
        return self.materialize().__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return self.materialize().clone()
