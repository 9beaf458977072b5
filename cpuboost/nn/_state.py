"""state_dict loading shared by the modules that hold weights in their own form."""
from __future__ import annotations

from typing import Optional

import torch


def incoming(state_dict, key: str, current: torch.Tensor, strict: bool, missing_keys: list,
             error_msgs: list) -> Optional[torch.Tensor]:
    """The tensor to load for ``key``, or None (missing, or the wrong shape; both recorded the
    way nn.Module's own loader records them, so load_state_dict reports them as usual)."""
    if key not in state_dict:
        if strict:
            missing_keys.append(key)
        return None
    value = state_dict[key]
    if tuple(value.shape) != tuple(current.shape):
        error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                          f"{tuple(value.shape)}, the shape in current model is "
                          f"{tuple(current.shape)}.")
        return None
    return value.detach()


def refuse_cast(module, fn, compute_dtype: torch.dtype, holds: str, remedy: str) -> None:
    """``.to()/.float()/.half()`` would silently bypass a weight held in a kernel's form:
    raise if ``fn`` (what ``Module._apply`` applies) changes the dtype or leaves the CPU."""
    probe = fn(torch.zeros(1, dtype=compute_dtype))
    if probe.dtype != compute_dtype or probe.device.type != "cpu":
        raise RuntimeError(f"{type(module).__name__} holds {holds}; it cannot be moved or "
                           f"cast. {remedy}")


def refuse_int8_load(module, state_dict, prefix: str, error_msgs: list) -> None:
    """An int8 layer's ``state_dict`` entries (codes, scales, zero points) describe it, but
    ``load_state_dict`` cannot rebuild one from them: say so instead of listing its own keys
    as unexpected."""
    if any(k.startswith(prefix) and "." not in k[len(prefix):] for k in state_dict):
        error_msgs.append(f"{prefix[:-1] or 'the model'}: {type(module).__name__} holds int8 "
                          "weights, which load_state_dict cannot set; save the model with "
                          "cpuboost.save_quantized(model, path) and load it with "
                          "cpuboost.load_quantized(model_ctor, path).")
