"""Graph mode only: quantize once the activations that feed both an int8 layer and a residual
add, so Inductor fuses the add into the int8 conv before it.

In a ResNet block the input ``x`` feeds ``conv1`` (int8) and the residual add
``conv3(...) + x``. Inductor fuses an add into an int8 conv (one oneDNN call, uint8 out) only
when the add's other operand is a dequantized int8 tensor, as PT2E quantization leaves it. So
the module producing ``x`` (the block's last ReLU, or an int8 conv) returns
``dequant(quant(x))`` with ``conv1``'s input scale: ``conv1`` reads the same uint8 tensor, the
add reads it dequantized, and nothing is quantized twice. Numerically the residual is now int8 too (as with
PT2E); the eager int8 model keeps it float.

A conv whose output only feeds residual adds (a block's downsample branch) has no reader to
borrow a scale from: calibration observes its output (``residual_only_convs``) and graph mode
puts it on a uint8 grid of that range. The add then reads it dequantized and Inductor fuses
it into the other branch's int8 conv, instead of both convs writing fp32 and a separate pass
adding them. With the max-pool rule below, ResNet-50 int8 compiled at batch 16 went from 261 to
187 ms (one process each, same eager baseline range); output cosine vs fp32 0.99986 -> 0.99984.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cpuboost.nn.int8 import Int8Conv, _Int8
from cpuboost.passes._context import has_user_hooks, replace_module
from cpuboost.passes._dataflow import Dataflow, ModuleCall, OpCall
from cpuboost.quant.handoff import consumer
from cpuboost.report import PassRecord

_ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


class QuantizedOutput(nn.Module):
    """``inner``'s output quantized to uint8 and dequantized (what the int8 layer it feeds
    will see anyway)."""

    def __init__(self, inner: nn.Module, scale: float, zero_point: int):
        super().__init__()
        self.inner, self.scale, self.zero_point = inner, scale, zero_point

    def forward(self, *args, **kwargs):
        qd = torch.ops.quantized_decomposed
        y = self.inner(*args, **kwargs)
        q = qd.quantize_per_tensor.default(y, self.scale, self.zero_point, 0, 255, torch.uint8)
        return qd.dequantize_per_tensor.default(q, self.scale, self.zero_point, 0, 255,
                                                torch.uint8)


def _int8_reader(flow: Dataflow, users, key):
    """A static int8 conv among ``users`` that takes ``key`` as its first input. Only convs:
    Inductor fuses an add into an int8 Linear only with a float other operand (it does not
    quantize it, for accuracy), so quantizing a Linear's residual would only add error
    (measured on BERT-base: output cosine vs fp32 0.99976 -> 0.99904)."""
    for u in users:
        if (isinstance(u, ModuleCall) and isinstance(u.module, Int8Conv) and not u.module.dynamic
                and u.module.qmax == 255 and u.module.smooth is None and u.in_keys
                and u.in_keys[0] == key):
            return u.module
    return None


def _is_add(user) -> bool:
    return isinstance(user, OpCall) and user.name in _ADDS


def residual_only_convs(flow: Dataflow, convs: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The convs (name -> module) on the second side of a residual add whose both sides are
    conv outputs used by nothing else (through identity modules): the first side stays float
    for Inductor to fuse the add into its conv. Call before hooking the convs."""
    ends = {}  # the key an add reads -> the conv that made it
    for name, m in convs.items():
        calls = flow.calls_of(m)
        if len(calls) != 1 or calls[0].out_key is None or has_user_hooks(m):
            continue
        _, key = consumer(flow, calls[0].out_key)
        users = flow.real_consumers(key)
        if users and all(_is_add(u) for u in users):
            ends[key] = name
    found = {}
    for op in flow.ops:
        if (_is_add(op) and len(op.in_keys) == 2 and op.in_keys[0] != op.in_keys[1]
                and all(k in ends for k in op.in_keys)):
            name = ends[op.in_keys[1]]
            found[name] = convs[name]
    return found


def _pooled_readers(flow: Dataflow, key) -> list:
    """The static int8 convs reading ``key`` after a max pooling module (and identity
    modules), when they are its only users and share one input grid: quantizing before the
    pool gives them the same uint8 values (max commutes with rounding), the pool reads 4x
    fewer bytes and the conv before it writes uint8, not fp32 (ResNet-50's stem at batch 16:
    20.6 ms writing fp32 of 227 ms in all)."""
    pool, _ = consumer(flow, key)
    if not (isinstance(pool, ModuleCall) and isinstance(pool.module, _MAX_POOLS)
            and len(flow.calls_of(pool.module)) == 1 and pool.out_key is not None):
        return []
    users = flow.real_consumers(pool.out_key)
    readers = [_int8_reader(flow, [u], pool.out_key) for u in users]
    if not readers or None in readers or len({(r.x_scale, r.x_zp) for r in readers}) != 1:
        return []
    return readers


def quantize_shared_outputs(model: nn.Module, flow: Optional[Dataflow], rec: PassRecord) -> None:
    """Put the outputs described above on their grids (``flow`` None: only the residual
    grids a recipe carries)."""
    names = {id(m): n for n, m in model.named_modules()}
    done: set[int] = set()
    for m in model.modules():
        grid = getattr(m, "residual_grid", None) if isinstance(m, _Int8) else None
        if grid is not None and not has_user_hooks(m):
            m.output_grid = grid
            done.add(id(m))
            rec.apply(f"{names[id(m)]}: output (read only by residual adds) quantized to its "
                      "calibrated range")
    for call in flow.calls if flow is not None else ():
        m = call.module
        if (call.out_key is None or id(m) in done
                or has_user_hooks(m) or len(flow.calls_of(m)) != 1
                or id(m) not in names):
            continue
        users = flow.real_consumers(call.out_key)
        reader = _int8_reader(flow, users, call.out_key)
        adds = [u for u in users if _is_add(u)]
        if reader is None or not adds:
            pooled = _pooled_readers(flow, call.out_key) if isinstance(m, _Int8) else []
            if pooled and m.out_q is None:
                m.output_grid = (pooled[0].x_scale, pooled[0].x_zp)
                done.add(id(m))
                rec.apply(f"{names[id(m)]}: output quantized for "
                          f"{', '.join(names.get(id(r), '?') for r in pooled)} (max pooling "
                          "runs on uint8)")
            continue
        if isinstance(m, _Int8):  # the compiled form quantizes the conv's output itself
            m.output_grid = (reader.x_scale, reader.x_zp)
        elif any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
            continue  # wrapping would rename its state_dict keys (name.inner.*)
        else:
            replace_module(model, m, QuantizedOutput(m, reader.x_scale, reader.x_zp))
        reader.input_on_grid = True
        done.add(id(m))
        rec.apply(f"{names[id(m)]}: output quantized once for {names.get(id(reader), '?')} "
                  "and the residual add")


__all__ = ["QuantizedOutput", "quantize_shared_outputs", "residual_only_convs"]
