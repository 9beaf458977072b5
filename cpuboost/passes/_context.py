"""What every pass receives, and the one way passes swap modules (keeping the user's hooks)."""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from cpuboost.config import OptimizeConfig
from cpuboost.hw import CpuFeatures
from cpuboost.passes._dataflow import Dataflow
from cpuboost.report import PassRecord

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


@dataclass
class PassContext:
    config: OptimizeConfig
    hw: CpuFeatures
    record: PassRecord
    flow: Optional[Dataflow] = None  # what the model executed on a real input, when known


class ForwardStandIn:
    """Base of the objects cpuboost installs as a model's instance-level ``forward`` (the
    first-call passes, compiled forwards, the beam-search prefill): they take ``*args,
    **kwargs`` but show the model's own signature. transformers' ``generate()`` reads
    ``inspect.signature(model.forward)`` to choose what it passes: behind a bare ``(*args,
    **kwargs)`` it passed no ``position_ids`` (XLM-R's causal LM, which numbers positions its
    own way without them, generated other tokens than stock) and no ``logits_to_keep`` (the
    prompt's logits came out over the whole vocabulary at every position)."""

    model: nn.Module

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.model).forward.__get__(self.model))


def has_user_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def names_of(root: nn.Module, target: nn.Module) -> list[str]:
    """Every qualified name under which ``target`` is registered (a module may be shared)."""
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is target]


def replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` wherever ``target`` is registered; the user's hooks and its eval mode move
    with it (a new module starts in training mode, which export and the checks refuse)."""
    if not target.training:
        new.eval()
    for attr in _HOOK_DICTS:
        if hasattr(target, attr) and hasattr(new, attr):
            getattr(new, attr).update(getattr(target, attr))
    names = names_of(root, target)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, new)
    if not names and target is root:
        raise AssertionError("the root module cannot be replaced in place")
    return names


def shell(model: nn.Module) -> nn.Module:
    """Graph mode changes no module: compiling reads the weights and freezing turns them into
    graph constants. So instead of a deep copy (a third copy of every weight), the result is a
    new root object sharing the original's submodules and weights, with its own hooks and
    ``forward``. Measured on BERT-base fp32, RSS vs eager: after compiling 2.12x with a deep
    copy, 1.58x with this (peak during compile 2.26x -> 1.72x)."""
    out = copy.copy(model)
    for attr in _HOOK_DICTS:
        if attr in model.__dict__:
            setattr(out, attr, type(getattr(model, attr))(getattr(model, attr)))
    return out


def shell_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` of ``root`` (a shell), itself made a shell, with every module
    on the way: ``root``'s submodules as the caller's model sees them stay as they were."""
    parent = root
    for name in path.split("."):
        child = shell(parent._modules[name])
        parent._modules = dict(parent._modules)  # (a shell shares the original's dict)
        parent._modules[name] = child
        parent = child
    return parent


def weight_bytes(model: nn.Module) -> int:
    """Bytes held in parameters, buffers and packed weights (each tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        if hasattr(m, "weight_bytes") and callable(m.weight_bytes):
            total += m.weight_bytes()
            held = getattr(m, "_w", None)
            if isinstance(held, torch.Tensor):  # a table shared by two modules counts once
                if id(held) in seen:
                    total -= held.numel() * held.element_size()
                seen.add(id(held))
    return total
