"""Input validation for optimize(): every user mistake raises before anything is changed."""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from cpuboost.config import OptimizeConfig
from cpuboost.errors import (InvalidModelError, SampleInputError, TrainingModeError,
                             UnsupportedDeviceError, UnsupportedDtypeError,
                             UnsupportedRequestError)
from cpuboost.hw import CpuFeatures


def check_model(model: Any, api: str = "cpuboost.optimize") -> None:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"{api} expects a torch.nn.Module, got {type(model).__name__}. "
            "Pass the model object itself (for a state_dict, build the model and load it first).")
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidModelError("TorchScript modules are not supported (TorchScript is "
                                "deprecated); pass the eager nn.Module instead.")
    bad = [(n, t.device) for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.device.type != "cpu"]
    if bad:
        name, device = bad[0]
        hint = ("materialize it first, e.g. model.to_empty(device='cpu') and load the weights"
                if device.type == "meta" else "move it with model.to('cpu')")
        raise UnsupportedDeviceError(
            f"{len(bad)} parameter(s)/buffer(s) are not on the CPU (first: {name!r} on {device}); "
            f"cpuboost optimizes CPU inference: {hint}.")
    training = [n or "<root>" for n, m in model.named_modules() if m.training]
    if training:
        raise TrainingModeError(
            f"{len(training)} module(s) are in training mode (first: {training[0]!r}); "
            f"{api} prepares inference: call model.eval() first. (Training "
            "optimization with an optimizer is not supported yet.)")


def ipex_only_arguments(optimizer, optimize_lstm, split_master_weight_for_bf16,
                        fuse_update_step, concat_linear) -> list[tuple[str, str]]:
    """``ipex.optimize``'s arguments cpuboost has no pass for: (name, what happens instead) for
    each one set, for the report; training (an optimizer) raises before anything changes."""
    if optimizer is not None:
        raise UnsupportedRequestError(
            f"cpuboost.optimize prepares a model for inference; training with an optimizer "
            f"(got optimizer={type(optimizer).__name__}) is not supported yet. Train with stock "
            "PyTorch (torch.autocast('cpu', dtype=torch.bfloat16) for bf16), then call "
            "cpuboost.optimize(model.eval()) for inference. Nothing was changed.")
    notes = []
    if optimize_lstm:
        notes.append(("optimize_lstm", "nothing to replace: stock PyTorch already runs nn.LSTM "
                                       "inference on oneDNN's LSTM (aten::mkldnn_rnn_layer)"))
    for name, value in (("split_master_weight_for_bf16", split_master_weight_for_bf16),
                        ("fuse_update_step", fuse_update_step)):
        if value:
            notes.append((name, "a training option: no effect without an optimizer (as in IPEX)"))
    if concat_linear:
        notes.append(("concat_linear", "not done: linears sharing an input stay separate (on "
                                       "the LLM decode path it measured ~2% of a step; "
                                       "docs/llm.md)"))
    return notes


def check_dtype(cfg: OptimizeConfig, hw: CpuFeatures) -> None:
    if cfg.dtype == torch.float16 and not (hw.native_fp16
                                          and torch.ops.mkldnn._is_mkldnn_fp16_supported()):
        raise UnsupportedDtypeError(
            "dtype=torch.float16 needs a CPU with native fp16 (AVX512-FP16, AMX-FP16 or Arm "
            f"FP16); this one has {sorted(hw.flags) or 'none of them'}. Use "
            "dtype=torch.bfloat16" + (" (native here)" if hw.native_bf16 else "") + " instead.")


BF16_WEIGHTS_NOTE = (
    "dtype=torch.bfloat16 on a CPU without bf16 instructions: linears hold bf16 weights and "
    "multiply them in float32 (cpuboost's AVX2 kernel); activations, convolutions and outputs "
    "stay float32, where emulated bf16 arithmetic would run several times slower")


def bf16_weights_only(dtype, hw: CpuFeatures) -> bool:
    """bf16 asked for on a CPU without bf16 instructions where cpuboost's AVX2 kernel runs:
    there the linears hold bf16 weights and multiply in float32, and everything else stays
    float32, instead of emulating bf16 arithmetic (several times slower than float32). Half
    the weight bytes; a decode step's GEMVs read half the memory (GPT-2's 48 block linears at 1
    token: 8.4 vs 17.9 ms fp32, docs/optimize.md)."""
    if dtype != torch.bfloat16 or hw.native_bf16 or not {"avx2", "fma"} <= hw.flags:
        return False
    from cpuboost.kernels import gemm_ops
    return gemm_ops()


def emulated_bf16(dtype, hw: CpuFeatures, stacklevel: int = 3) -> Optional[str]:
    """bf16 asked for on a CPU without bf16 instructions: a Python warning (RuntimeWarning) and
    the same text for the report's warnings. It runs, correctly, but several times slower than
    float32, which is not what anyone asks bf16 for."""
    if dtype != torch.bfloat16 or hw.native_bf16:
        return None
    text = ("dtype=torch.bfloat16 on a CPU without bf16 instructions (AVX512-BF16, AMX-BF16 or "
            f"Arm BF16; this one has {', '.join(sorted(hw.flags)) or 'none of them'}): bf16 is "
            "emulated, so results are right but it runs several times slower than float32 "
            "(BERT-base measured 4.8x slower on an AVX2 CPU). Leave dtype=None for float32 here.")
    warnings.warn(text, RuntimeWarning, stacklevel=stacklevel)
    return text


def check_requests(cfg: OptimizeConfig, hw: CpuFeatures) -> None:
    """Explicit requests that cannot be honoured raise here, before the model is touched."""
    from cpuboost.hw.features import onednn_runs
    if cfg.weights_prepack and "weights_prepack" in cfg.explicit and not onednn_runs(
            cfg.compute_dtype, hw):
        raise UnsupportedRequestError(
            f"weights_prepack=True was asked for, but this torch build's oneDNN cannot run "
            f"{cfg.compute_dtype} here; leave weights_prepack=None to let cpuboost skip it "
            "(the report then says so).")


def as_call(sample_input) -> tuple[tuple, dict]:
    """sample_input may be a tensor, a tuple/list of positional args, or a dict of kwargs."""
    if isinstance(sample_input, dict):
        return (), dict(sample_input)
    if isinstance(sample_input, (tuple, list)):
        return tuple(sample_input), {}
    return (sample_input,), {}


def run_sample(model: nn.Module, call: tuple[tuple, dict], what: str = "sample_input"):
    """``model(*args, **kwargs)`` for a check: the buffers a forward changes (a step counter)
    are put back afterwards, so that every run of the check starts where the first did and the
    user's model is left as it was (``buffers_kept``)."""
    args, kwargs = call
    target = call_target(model, call)
    try:
        with torch.no_grad(), buffers_kept(model):
            return target(*args, **kwargs)
    except Exception as e:
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
        raise SampleInputError(
            f"the model raised {type(e).__name__} on {what} (positional {shapes}, keyword "
            f"{sorted(kwargs)}): {e}. Pass an input the model accepts: a tensor, a tuple of "
            "positional arguments, or a dict of keyword arguments. The model was not changed."
        ) from e


def tensor_versions(tensors) -> list[int]:
    """Version counters (a forward that updates a buffer in place moves its counter; inference
    tensors have none and cannot be changed in place outside inference mode)."""
    return [-1 if t.is_inference() else t._version for t in tensors]


def call_target(model: nn.Module, call) -> Any:
    """What a (replayed) call goes through: the model, or the custom method the first call
    came through (``call.entry``, api._FreshCall)."""
    entry = getattr(call, "entry", "forward")
    return model if entry == "forward" else getattr(model, entry)


MAX_BUFFER_COPY = 256 << 20  # bytes of buffers a check copies to put them back


def buffer_state(model: nn.Module) -> Optional[dict[str, tuple[torch.Tensor, int]]]:
    """Each buffer by name: (the tensor, its version), or None where the buffers total more than
    ``MAX_BUFFER_COPY`` (too large to copy and put back)."""
    named = list(model.named_buffers())
    if sum(b.numel() * b.element_size() for _, b in named) > MAX_BUFFER_COPY:
        return None
    return {name: (b, tensor_versions([b])[0]) for name, b in named}


def changed_buffers(model: nn.Module, state: dict) -> list[str]:
    """Names of the buffers a run changed since ``state``: in place, or replaced."""
    now = dict(model.named_buffers())
    return [name for name, (b, version) in state.items() if name in now
            and (now[name] is not b or tensor_versions([b])[0] != version)]


def put_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Set the named buffers to ``values``: in place where the tensor still fits (a compiled
    graph may hold it), else as a new buffer. Names the model no longer has are skipped."""
    for name, value in values.items():
        owner, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        current = module._buffers.get(attr)
        if current is None and attr not in module._buffers:
            continue
        if current is not None and current.shape == value.shape and \
                current.dtype == value.dtype and not current.is_inference():
            with torch.no_grad():
                current.copy_(value)
        else:
            module._buffers[attr] = value.clone()


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """Buffers the body's runs of ``model`` change are put back to their values before it.
    Yields False (and keeps nothing) where they are too large to copy."""
    state = buffer_state(model)
    if state is None:
        yield False
        return
    before = {name: b.clone() for name, (b, _) in state.items()}
    try:
        yield True
    finally:
        changed = changed_buffers(model, state)
        if changed:
            put_buffers(model, {name: before[name] for name in changed})


def replay_copy(model: nn.Module, args, kwargs, plain_only: bool = False,
                hooks_checked: bool = False) -> tuple[Optional[tuple], str]:
    """A copy of a call's arguments, taken before it runs, to run ``model`` on again (a forward
    may change what it is given: generate()'s first call hands in an empty key/value cache that
    the forward fills), or (None, why not): also where the model's modules have forward hooks,
    which a second run would fire again (``hooks_checked``: already found to have none, before
    a recording added its own). ``plain_only``: tensors, numbers, strings and None (in lists,
    tuples and dicts) only."""
    from cpuboost.passes._context import has_user_hooks  # (passes import this module)
    hooked = None if hooks_checked else next(
        (n for n, m in model.named_modules() if has_user_hooks(m)), None)
    if hooked is not None:
        return None, f"module {hooked or '<root>'!r} has forward hooks a second run would fire"
    from torch.nn.modules import module as _module
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None, ("global module hooks (torch.nn.modules.module.register_module_forward_"
                      "hook) are set, which a second run would fire")
    leaves, _ = tree_flatten((args, kwargs))
    plain = (torch.Tensor, int, float, bool, str, type(None))
    odd = next((x for x in leaves if isinstance(x, nn.Module)
                or (plain_only and not isinstance(x, plain))), None)
    if odd is not None:  # (copying a module could mean copying the model)
        return None, f"the call passed a {type(odd).__name__}"
    try:
        return copy.deepcopy((args, kwargs)), ""
    except Exception as e:
        return None, f"the call's arguments could not be copied ({type(e).__name__})"
