"""Splitting a call's inputs into per-stream batches and joining the streams' outputs.

A hint mirrors the structure of what it describes (``MultiStreamModuleHint(0, mask=0,
cache=None)``); a leaf hint is the dimension to split/concatenate along, or None (give every
stream the whole value / return the streams' values as a list). A leaf hint covers everything
below it. Batch sizes that do not divide evenly give the first ``B % n`` streams one more row."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

from cpuboost.errors import ConfigError


class MultiStreamModuleHint:
    """IPEX's hint: positional and keyword entries mirroring a call (or an output)."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"MultiStreamModuleHint({', '.join(parts)})"


def chunk_sizes(batch: int, parts: int) -> list[int]:
    base, extra = divmod(batch, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _leaves(value, hint, path: str):
    """(path, tensor, dim) for every tensor a hint splits."""
    if isinstance(hint, int) and not isinstance(hint, bool):
        if isinstance(value, torch.Tensor):
            yield path, value, hint
        elif isinstance(value, Mapping):
            for k, v in value.items():
                yield from _leaves(v, hint, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from _leaves(v, hint, f"{path}[{i}]")
    elif isinstance(hint, Mapping) and isinstance(value, Mapping):
        for k, v in value.items():
            if k not in hint:
                raise ConfigError(f"the split hint has no entry for {path}[{k!r}]; add one "
                                  "(a dimension, or None to give every stream the whole value)")
            yield from _leaves(v, hint[k], f"{path}[{k!r}]")
    elif isinstance(hint, (list, tuple)) and isinstance(value, (list, tuple)):
        if len(hint) != len(value):
            raise ConfigError(f"the split hint for {path} has {len(hint)} entries but the value "
                              f"has {len(value)}")
        for i, (v, h) in enumerate(zip(value, hint)):
            yield from _leaves(v, h, f"{path}[{i}]")
    elif hint is not None:
        raise ConfigError(f"the split hint for {path} is {hint!r} but the value is a "
                          f"{type(value).__name__}; hints are a dimension, None, or a "
                          "list/tuple/dict mirroring the value")


def _cut(value, hint, bounds: tuple[int, int]):
    start, end = bounds
    if isinstance(hint, int) and not isinstance(hint, bool):
        if isinstance(value, torch.Tensor):
            return value.narrow(hint, start, end - start)
        if isinstance(value, Mapping):
            return type(value)({k: _cut(v, hint, bounds) for k, v in value.items()})
        if isinstance(value, (list, tuple)):
            return _rebuild(value, [_cut(v, hint, bounds) for v in value])
        return value
    if isinstance(hint, Mapping) and isinstance(value, Mapping):
        return type(value)({k: _cut(v, hint[k], bounds) for k, v in value.items()})
    if isinstance(hint, (list, tuple)) and isinstance(value, (list, tuple)):
        return _rebuild(value, [_cut(v, h, bounds) for v, h in zip(value, hint)])
    return value


def _rebuild(like, items):
    if isinstance(like, tuple) and hasattr(like, "_fields"):  # namedtuple
        return type(like)(*items)
    return type(like)(items)


def _call_hints(hint: MultiStreamModuleHint, args, kwargs) -> tuple[list, dict]:
    """Per-argument hints. A hint with one positional entry and nothing else (IPEX's default
    ``MultiStreamModuleHint(0)``) applies to every argument."""
    if len(hint.args) == 1 and not hint.kwargs:
        return [hint.args[0]] * len(args), {k: hint.args[0] for k in kwargs}
    if len(hint.args) != len(args):
        raise ConfigError(f"input_split_hint has {len(hint.args)} positional entries but the "
                          f"call passed {len(args)} positional arguments")
    missing = [k for k in kwargs if k not in hint.kwargs]
    if missing:
        raise ConfigError(f"input_split_hint has no entry for keyword argument(s) {missing}; "
                          "add them (a dimension, or None to give every stream the whole value)")
    return list(hint.args), {k: hint.kwargs[k] for k in kwargs}


def split_call(args: tuple, kwargs: dict, hint: MultiStreamModuleHint,
               streams: int) -> list[tuple[tuple, dict]]:
    """Cut a call into at most ``streams`` calls over consecutive parts of the batch."""
    arg_hints, kw_hints = _call_hints(hint, args, kwargs)
    leaves = [x for i, a in enumerate(args) for x in _leaves(a, arg_hints[i], f"args[{i}]")]
    leaves += [x for k, v in kwargs.items() for x in _leaves(v, kw_hints[k], k)]
    if not leaves:
        raise ConfigError("the split hint selects no tensor to split; give input_split_hint "
                          "naming the batch dimension of at least one input")
    sizes = {}
    for path, t, dim in leaves:
        if not -t.dim() <= dim < max(t.dim(), 1) or t.dim() == 0:
            raise ConfigError(f"{path} has shape {tuple(t.shape)}: cannot split along dim {dim}")
        sizes[path] = t.shape[dim]
    batch = next(iter(sizes.values()))
    if any(s != batch for s in sizes.values()):
        shown = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise ConfigError(f"inputs disagree on the batch size along their split dimensions "
                          f"({shown}); give an input_split_hint (None for inputs to share, the "
                          "batch dimension for the others) or a split function such as "
                          "cpuboost.runtime.embedding_bag_split(...) for EmbeddingBag inputs")
    bounds, start = [], 0
    for n in chunk_sizes(batch, min(streams, batch)):
        bounds.append((start, start + n))
        start += n
    return [(tuple(_cut(a, arg_hints[i], b) for i, a in enumerate(args)),
             {k: _cut(v, kw_hints[k], b) for k, v in kwargs.items()}) for b in bounds]


def concat_outputs(outputs: list, hint, path: str = "output"):
    """Join the streams' outputs: tensors along the hinted dim, structures element-wise."""
    first = outputs[0]
    if isinstance(hint, MultiStreamModuleHint):
        if len(hint.args) == 1 and not hint.kwargs:
            hint = hint.args[0]
        elif hint.kwargs:
            hint = hint.kwargs
        else:
            hint = hint.args
    if hint is None:
        return list(outputs)
    if isinstance(first, torch.Tensor):
        if not isinstance(hint, int):
            raise ConfigError(f"{path} is a tensor but its output_concat_hint is {hint!r}")
        if first.dim() == 0:
            raise ConfigError(f"{path} is a 0-d tensor and cannot be concatenated; give "
                              "output_concat_hint None for it (a list, one per stream) or a "
                              "concat function")
        return torch.cat(outputs, dim=hint)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        if isinstance(hint, Mapping) and any(k not in hint for k in keys):
            missing = [k for k in keys if k not in hint]
            raise ConfigError(f"output_concat_hint has no entry for {path} keys {missing}; add "
                              "them (a dimension, or None for a list per stream)")
        joined = {k: concat_outputs([o[k] for o in outputs],
                                    hint[k] if isinstance(hint, Mapping) else hint,
                                    f"{path}[{k!r}]") for k in keys}
        try:
            return type(first)(**joined)  # HF ModelOutput and plain dicts
        except TypeError:
            return type(first)(joined)
    if isinstance(first, (list, tuple)):
        hints = hint if isinstance(hint, (list, tuple)) else [hint] * len(first)
        return _rebuild(first, [concat_outputs([o[i] for o in outputs], hints[i],
                                               f"{path}[{i}]") for i in range(len(first))])
    try:  # the same plain value from every stream (None, a flag): keep one
        if all(bool(o == first) for o in outputs[1:]):
            return first
    except (TypeError, ValueError, RuntimeError):  # == gave something without one truth value
        pass
    return list(outputs)


Splitter = Callable[[tuple, dict, int], list]


def embedding_bag_split(indices: int | str = 1, offsets: int | str = 2,
                        per_sample_weights: int | str | None = None,
                        include_last_offset: bool = False, other_dim: int | None = 0) -> Splitter:
    """A split function for EmbeddingBag-style inputs. ``indices``/``offsets``/
    ``per_sample_weights`` name arguments by position or keyword. Offsets are 1-D (one table) or
    2-D (tables x batch, with indices tables x N); per-sample weights follow the indices. Every
    other tensor is split along ``other_dim`` (None: shared). The batch size is the number of
    bags: offsets.shape[-1] (minus one with ``include_last_offset``)."""

    def get(args, kwargs, key):
        return args[key] if isinstance(key, int) else kwargs[key]

    def put(args, kwargs, key, value):
        if isinstance(key, int):
            args[key] = value
        else:
            kwargs[key] = value

    def split(args: tuple, kwargs: dict, streams: int) -> list:
        try:
            idx, off = get(args, kwargs, indices), get(args, kwargs, offsets)
            psw = None if per_sample_weights is None else get(args, kwargs,
                                                             per_sample_weights)
        except (IndexError, KeyError) as e:
            raise ConfigError(f"embedding_bag_split: the call has no argument {e}; name the "
                              "indices/offsets arguments by position or keyword") from None
        if not all(isinstance(t, torch.Tensor) for t in (idx, off)):
            raise ConfigError(f"embedding_bag_split: indices and offsets must be tensors, got "
                              f"{type(idx).__name__} and {type(off).__name__}")
        if off.dim() not in (1, 2) or idx.dim() != off.dim():
            raise ConfigError(f"embedding_bag_split: offsets {tuple(off.shape)} and indices "
                              f"{tuple(idx.shape)} must both be 1-D, or both 2-D (tables x ...)")
        bags = off.shape[-1] - (1 if include_last_offset else 0)
        rows_i, rows_o = (idx, off) if off.dim() == 2 else (idx[None], off[None])
        rows_w = None if psw is None else (psw if off.dim() == 2 else psw[None])
        sizes = chunk_sizes(bags, min(streams, bags))
        starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        # every part's first index, per table, in one read: [tables][parts + 1]
        edge = torch.cat([rows_o, torch.full((rows_o.shape[0], 1), rows_i.shape[1],
                                             dtype=rows_o.dtype)], 1)[:, starts].tolist()
        pieces = []
        for p, n in enumerate(sizes):
            start, end = starts[p], starts[p + 1]
            los, his = [e[p] for e in edge], [e[p + 1] for e in edge]
            if len(set(los)) == 1 and len(set(his)) == 1:  # same layout in every table: views
                lo, hi = los[0], his[0]
                cut_i = rows_i[:, lo:hi]
                cut_o = rows_o[:, start:end + (1 if include_last_offset else 0)] - lo
                cut_w = None if rows_w is None else rows_w[:, lo:hi]
            elif off.dim() == 2 and len({h - lo for h, lo in zip(his, los)}) > 1:
                raise ConfigError("embedding_bag_split: with 2-D indices every table must have "
                                  "the same number of indices in each stream's part (bags of "
                                  "equal size per sample); pass 1-D inputs per table instead")
            else:
                cut_i = torch.stack([rows_i[t, lo:hi] for t, (lo, hi) in
                                     enumerate(zip(los, his))])
                cut_o = torch.stack([rows_o[t, start:end + (1 if include_last_offset else 0)]
                                     - lo for t, lo in enumerate(los)])
                cut_w = None if rows_w is None else torch.stack(
                    [rows_w[t, lo:hi] for t, (lo, hi) in enumerate(zip(los, his))])
            part_args, part_kwargs = list(args), dict(kwargs)
            for a_i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a_i not in (indices, offsets,
                                                               per_sample_weights):
                    part_args[a_i] = a if other_dim is None else a.narrow(other_dim, start, n)
            for k, a in kwargs.items():
                if isinstance(a, torch.Tensor) and k not in (indices, offsets,
                                                             per_sample_weights):
                    part_kwargs[k] = a if other_dim is None else a.narrow(other_dim, start, n)
            one = off.dim() == 1
            put(part_args, part_kwargs, indices, cut_i[0] if one else cut_i)
            put(part_args, part_kwargs, offsets, cut_o[0] if one else cut_o)
            if cut_w is not None:
                put(part_args, part_kwargs, per_sample_weights, cut_w[0] if one else cut_w)
            pieces.append((tuple(part_args), part_kwargs))
        return pieces

    return split


def make_splitter(hint) -> Splitter:
    if callable(hint) and not isinstance(hint, MultiStreamModuleHint):
        return hint
    if isinstance(hint, int) and not isinstance(hint, bool):
        hint = MultiStreamModuleHint(hint)
    if not isinstance(hint, MultiStreamModuleHint):
        raise ConfigError(f"input_split_hint must be a MultiStreamModuleHint, a dimension or a "
                          f"function (args, kwargs, streams) -> [(args, kwargs), ...]; got "
                          f"{type(hint).__name__}")
    return lambda args, kwargs, streams: split_call(args, kwargs, hint, streams)


def make_joiner(hint) -> Callable[[list], Any]:
    if callable(hint) and not isinstance(hint, MultiStreamModuleHint):
        return hint
    return lambda outputs: concat_outputs(outputs, hint)
