"""One copy of each folded constant, however many graphs a model compiles into.

Freezing folds what depends only on weights (bf16 casts under autocast, transposes, MKL/oneDNN
weight packing) into new constant tensors, separately for every graph. A model that compiles
into several graphs — ``generate`` does: prefill, the first decode step, then a graph with the
cache length dynamic — so kept one packed copy of every weight per graph: GPT-2 (124M) bf16
generate held 4 graphs and 2.8x the eager process's RSS.

While the backend compiles, each constant the folder produces is keyed by how it was made: the
op and its non-tensor arguments, recursively down to the weights it reads, which are identified
by object, version counter, data pointer and a sample of values (an in-place update such as
``load_state_dict`` bumps the version, ``param.data = ...`` moves the pointer, so neither matches
a constant folded from the old values). A later graph that folds the same recipe gets the
tensor made the first time, without computing it again. Entries hold everything weakly: they
live exactly as long as some compiled graph still uses the constant.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch

_Key = tuple
_MEMO: dict[_Key, tuple[weakref.ref, tuple[weakref.ref, ...]]] = {}
# id(folded tensor) -> (weakref, recipe key, leaves): a constant folded in an earlier round or
# graph is keyed by its recipe, not by its identity (an intermediate such as the bf16 cast of a
# weight that is then packed is freed with its graph, and the next graph makes a new one).
_ORIGIN: dict[int, tuple[weakref.ref, _Key, tuple[weakref.ref, ...]]] = {}


class _NoRecipe(Exception):
    """An argument that cannot be part of a key (a non-constant, an unhashable value)."""


def _leaf(t: torch.Tensor) -> tuple[_Key, torch.Tensor]:
    """A weight's key: its object, version counter (bumped by in-place updates such as
    ``load_state_dict``), data pointer (``param.data = other`` and ``module.to(...)`` swap the
    data without bumping the version) and a sample of its values (so a freed buffer reused at
    the same address is not taken for the old one). A pinned weight keeps its key while its
    version and data pointer are the pinned ones."""
    if t.layout != torch.strided or t.device.type == "meta":
        raise _NoRecipe  # opaque (a oneDNN-packed tensor) or no data: never shared as a leaf
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter: never shared
        raise _NoRecipe from None
    pinned = _PINNED.get(id(t))
    if pinned is not None and pinned[0]() is t and pinned[2] == (version, t.data_ptr()):
        return pinned[1], t
    return ("tensor", id(t), version, t.data_ptr(), _sample(t)), t


# id(weight) -> (weakref, key, (version, data pointer)): weights graph mode released and
# restored with the same values (compile/release.py); their storage moved, so the key they were
# folded under is kept until they change (an in-place update, ``param.data = other``).
_PINNED: dict[int, tuple[weakref.ref, _Key, tuple[int, int]]] = {}


def pin(t: torch.Tensor) -> None:
    """Keep ``t``'s current key (the first time) for its current version and data: call it when
    its values are, again, those it was folded from."""
    for k in [k for k, (r, _, _) in _PINNED.items() if r() is None]:
        del _PINNED[k]
    pinned = _PINNED.get(id(t))
    key = pinned[1] if pinned is not None and pinned[0]() is t else _leaf(t)[0]
    _PINNED[id(t)] = (weakref.ref(t), key, (t._version, t.data_ptr()))


def folded_constants() -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """(weight, constant, op) for each live constant folded by ``op`` from that one weight."""
    out = []
    for value_ref, key, leaf_refs in list(_ORIGIN.values()):
        value = value_ref()
        if value is None or len(leaf_refs) != 1 or leaf_refs[0]() is None or key[0] != "fold":
            continue
        out.append((leaf_refs[0](), value, key[1]))
    return out


def _sample(t: torch.Tensor) -> tuple:
    if t.numel() == 0 or not t.is_contiguous():
        return ()
    flat = t.detach().view(-1)
    return tuple(flat[::max(1, flat.numel() // 16)][:16].tolist())


def made_once(tag: tuple, source: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, a function of ``source`` named by ``tag``, computed once while ``source`` is
    the same live object at the same version; remembered weakly."""
    try:
        key = (tag, _leaf(source)[0])
    except _NoRecipe:
        return make()
    hit = _find(key, (source,))
    if hit is not None:
        return hit
    value = make()
    _remember(key, (source,), value)
    return value


def _find(key, leaves):
    entry = _MEMO.get(key)
    if entry is None:
        return None
    value_ref, leaf_refs = entry
    value = value_ref()
    if value is None or len(leaf_refs) != len(leaves) or any(
            r() is not t for r, t in zip(leaf_refs, leaves)):
        del _MEMO[key]
        return None
    return value


def _remember(key, leaves, value):
    for k in [k for k, (v, _) in _MEMO.items() if v() is None]:  # drop entries of freed graphs
        del _MEMO[k]
    for k in [k for k, (v, _, _) in _ORIGIN.items() if v() is None]:
        del _ORIGIN[k]
    leaf_refs = tuple(weakref.ref(t) for t in leaves)
    _MEMO[key] = (weakref.ref(value), leaf_refs)
    _ORIGIN[id(value)] = (weakref.ref(value), key, leaf_refs)


def _freeze_arg(value, env, recipes, leaves):
    """A hashable stand-in for one argument of a folded node."""
    if isinstance(value, torch.fx.Node):
        if value in recipes:
            key, node_leaves = recipes[value]
            leaves.extend(node_leaves)
            return key
        if value.op == "get_attr" and isinstance(env.get(value), torch.Tensor):
            origin = _ORIGIN.get(id(env[value]))
            if origin is not None and origin[0]() is env[value]:
                origin_leaves = [r() for r in origin[2]]
                if all(t is not None for t in origin_leaves):
                    leaves.extend(origin_leaves)
                    return origin[1]
            key, t = _leaf(env[value])
            leaves.append(t)
            return key
        raise _NoRecipe
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_freeze_arg(v, env, recipes, leaves)
                                               for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _freeze_arg(v, env, recipes, leaves))
                                 for k, v in sorted(value.items()))
    if isinstance(value, torch.Tensor):
        raise _NoRecipe  # a tensor literal in the graph: not keyed
    try:
        hash(value)
    except TypeError:
        raise _NoRecipe from None
    return ("lit", type(value).__name__, value)


# The batch-size hint of oneDNN's linear weight packing only picks a layout: a weight packed
# for one M gives identical results at any M, and measured here (bf16, 2304x768, 768x3072,
# 50257x768; M = 1, 16, 128) no hint was consistently faster. MKL's packing is the same size and
# gives the same results for any hint. So the prefill graph (M = prompt length) and the decode
# graphs (M = 1) of ``generate`` share one packed copy.
_LAYOUT_HINT_ONLY = {"mkldnn._reorder_linear_weight": 1,  # op -> index of the hint argument
                     "mkl._mkl_reorder_linear_weight": 1}


def _recipe_args(node):
    drop = _LAYOUT_HINT_ONLY.get(str(node.target))
    if drop is None or len(node.args) <= drop:
        return node.args
    return node.args[:drop] + node.args[drop + 1:]


def _shared_deduce_value(original):
    """ConstantFolder computes each foldable node's value in ``_deduce_value``: look the node's
    recipe up first, so a constant another graph already holds is not even computed again."""
    def deduce_value(self, node):
        if node.op != "call_function" or self.lifted_constant_names is not None:
            return original(self, node)
        recipes = self.__dict__.setdefault("_cpuboost_recipes", {})
        leaves: list[torch.Tensor] = []
        try:
            key = ("fold", str(node.target),
                   _freeze_arg(_recipe_args(node), self.env, recipes, leaves),
                   _freeze_arg(node.kwargs, self.env, recipes, leaves))
        except _NoRecipe:
            return original(self, node)
        leaves = tuple(leaves)
        recipes[node] = (key, leaves)
        earlier = _find(key, leaves)
        expected = node.meta.get("val")
        if earlier is not None and (not isinstance(expected, torch.Tensor) or (
                tuple(expected.shape), expected.dtype) == (tuple(earlier.shape), earlier.dtype)):
            return earlier
        out = original(self, node)
        if isinstance(out, torch.Tensor):
            _remember(key, leaves, out)
        return out
    deduce_value.__wrapped__ = original
    return deduce_value


# Data pointers of the storages a frozen graph reads as they are (after folding), each with weak
# references to the tensors the graphs hold there: graph mode's WeightRelease never frees those.
# Recorded at folding, so graphs from Inductor's cache (which skips the post-grad passes, not
# freezing) count too. A record expires with its tensor: a pointer alone outlived the graph,
# and a later weight allocated at a freed address was taken as read (never released).
_READ_AS_IS: dict[int, list] = {}


def read_as_is(t: torch.Tensor) -> bool:
    """Whether a compiled graph reads ``t``'s storage as it is (not only folded into constants)."""
    ptr = t.untyped_storage().data_ptr()
    return any(r() is not None and r().untyped_storage().data_ptr() == ptr
               for r in _READ_AS_IS.get(ptr, ()))


def _recording_constant_fold(original, reads: dict):
    """Freezing folds a graph more than once (its patterns fold before packing, then the final
    fold): ``reads[id(gm)]`` keeps what the latest fold of each graph left it reading."""
    def constant_fold(gm, *args, **kwargs):
        out = original(gm, *args, **kwargs)
        reads[id(gm)] = ptrs = {}
        for node in gm.graph.find_nodes(op="get_attr"):
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                ptrs[value.untyped_storage().data_ptr()] = weakref.ref(value)
        return out
    constant_fold.__wrapped__ = original
    return constant_fold


@contextlib.contextmanager
def shared_folding():
    """While compiling: constants folded by Inductor's freezing are shared across graphs, and
    what the frozen graphs read as it is is recorded (``read_as_is``)."""
    from torch._inductor import freezing
    from torch._inductor.constant_folding import ConstantFolder
    original = ConstantFolder._deduce_value
    if hasattr(original, "__wrapped__"):  # already inside (a nested compile)
        yield
        return
    fold, reads = freezing.constant_fold, {}
    ConstantFolder._deduce_value = _shared_deduce_value(original)
    freezing.constant_fold = _recording_constant_fold(fold, reads)
    try:
        yield
    finally:
        ConstantFolder._deduce_value = original
        freezing.constant_fold = fold
        for ptr in list(_READ_AS_IS):  # records of freed graphs' tensors go
            alive = [r for r in _READ_AS_IS[ptr] if r() is not None]
            if alive:
                _READ_AS_IS[ptr] = alive
            else:
                del _READ_AS_IS[ptr]
        for ptrs in reads.values():
            for ptr, ref in ptrs.items():
                _READ_AS_IS.setdefault(ptr, []).append(ref)
