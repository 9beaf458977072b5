"""An empty parameter for a model left with none.

Packing moves weights into forms that are not parameters (panels, held tables, int8 codes). A
model whose every floating-point parameter was moved (OLMo: its LayerNorms have no weights;
an MLP of Linears) then has ``parameters()`` empty, and what reads the model's device or dtype
from its first parameter fails: Hugging Face's ``model.device``, and so ``generate()``, raised
StopIteration. The anchor answers those with the original's first floating-point parameter's
dtype and device; ``state_dict`` and ``load_state_dict`` leave it out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NAME = "cpuboost_parameter_anchor"
NOTE = (f"no floating-point parameter was left (all packed): an empty one was added as {NAME}, "
        "so model.device and model.dtype (which Hugging Face's generate() reads) keep working; "
        "it adds nothing to state_dict")


def _drop_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + NAME, None)


def _not_missing(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if k != NAME and not k.endswith("." + NAME)]


def float_parameter_kind(model: nn.Module) -> Optional[tuple[torch.dtype, torch.device]]:
    """(dtype, device) of ``model``'s first floating-point parameter (what Hugging Face reports
    as the model's), or None."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if p is None else (p.dtype, p.device)


def keep_a_parameter(model: nn.Module, kind: Optional[tuple[torch.dtype, torch.device]],
                     rec) -> None:
    """Give ``model`` an anchor if it had a floating-point parameter (of ``kind``) and has none
    now, and say so in ``rec`` (the report's record of the pass that ran last). So too each
    module inside it that answers ``.device`` from its parameters (a Hugging Face model within
    another: OLMo's OlmoModel inside OlmoForCausalLM; torch.jit.trace reads every attribute of
    every module, and its ``.device`` raised StopIteration)."""
    if kind is None:
        return
    anchored = False
    for m in model.modules():
        if (m is model or isinstance(getattr(type(m), "device", None), property)) \
                and float_parameter_kind(m) is None:
            _anchor(m, kind)
            anchored = True
    if anchored:
        rec.notes.append(NOTE)


def _anchor(module: nn.Module, kind: tuple[torch.dtype, torch.device]) -> None:
    dtype, device = kind
    # on the module itself, not a child module: a Sequential would call a child
    module.register_parameter(NAME, nn.Parameter(torch.empty(0, dtype=dtype, device=device),
                                                 requires_grad=False))
    module.register_state_dict_post_hook(_drop_from_state_dict)
    module.register_load_state_dict_post_hook(_not_missing)
