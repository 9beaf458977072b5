"""Graph mode only: quantize once the activations that feed both an int8 layer and a residual
add, so Inductor fuses the add into the int8 conv before it.

In a ResNet block the input ``x`` feeds ``conv1`` (int8) and the residual add
``conv3(...) + x``. Inductor fuses an add into an int8 conv (one oneDNN call, uint8 out) only
when the add's other operand is a dequantized int8 tensor, as PT2E quantization leaves it. So
the module producing ``x`` (the block's last ReLU, or an int8 conv) returns
``dequant(quant(x))`` with ``conv1``'s input scale: ``conv1`` reads the same uint8 tensor, the
add reads it dequantized, and nothing is quantized twice. Numerically the residual is now int8 too (as with
PT2E); the eager int8 model keeps it float.
"""
from __future__ import annotations

import torch
from torch import nn

from cpuboost.nn.int8 import Int8Conv, _Int8
from cpuboost.passes._context import has_user_hooks, replace_module
from cpuboost.passes._dataflow import Dataflow, ModuleCall
from cpuboost.report import PassRecord

_ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}


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


def quantize_shared_outputs(model: nn.Module, flow: Dataflow, rec: PassRecord) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    done: set[int] = set()
    for call in flow.calls:
        m = call.module
        if (call.out_key is None or id(m) in done
                or has_user_hooks(m) or len(flow.calls_of(m)) != 1
                or id(m) not in names):
            continue
        users = flow.real_consumers(call.out_key)
        reader = _int8_reader(flow, users, call.out_key)
        adds = [u for u in users if not isinstance(u, ModuleCall) and hasattr(u, "name")
                and u.name in _ADDS]
        if reader is None or not adds:
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


__all__ = ["QuantizedOutput", "quantize_shared_outputs"]
