"""The rewrites `cpuboost.llm.optimize` runs, each ``(model, cfg, rec) -> None`` on the copy.

They never modify a tensor in place: the copy shares its tensors with the original model
(`optimize` copies modules, not weights), so every change is a new tensor or a new module.
"""
from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import nn

from cpuboost.hw.features import detect, onednn_runs
from cpuboost.llm.config import LlmConfig, WoqConfig
from cpuboost.llm.structure import is_linear
from cpuboost.nn.fused import FusedConv1DLinear, FusedLinear, is_hf_conv1d
from cpuboost.nn.probe import why_not_plain_linear
from cpuboost.nn.woq import WoqLinear, why_not_woq
from cpuboost.passes._context import replace_module
from cpuboost.report import PassRecord


def cast_floats(model: nn.Module, cfg: LlmConfig, rec: PassRecord) -> None:
    """Floating parameters and buffers to the compute dtype (what ``model.to(dtype)`` does), as
    new tensors so the original model keeps its own."""
    changed, dtype = 0, cfg.compute_dtype
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                m._parameters[name] = nn.Parameter(p.detach().to(dtype),
                                                   requires_grad=False)
                changed += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
                changed += 1
    if changed:
        rec.apply(f"{changed} floating tensors cast to {dtype}")


def use_sdpa(model: nn.Module, rec: PassRecord) -> None:
    """Attention through torch's scaled_dot_product_attention (its CPU flash kernel)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None:
        rec.skip("attention", "the model has no transformers config: its attention is kept")
        return
    if current == "sdpa":
        rec.apply("attention already runs through torch's SDPA (CPU flash kernel)")
        return
    import transformers.utils.logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warning is our skip reason below
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError) as e:
        rec.skip("attention", f"kept {current!r}: transformers cannot switch it to sdpa ({e})")
        return
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config._attn_implementation != "sdpa":
        rec.skip("attention", f"kept {current!r}: this architecture does not dispatch "
                              "attention through transformers' attention interface")
        return
    rec.apply(f"attention: {current!r} -> 'sdpa' (torch's CPU flash kernel)")


def _output_projection(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def _dense(m: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight (out, in), bias) of a Linear or transformers' Conv1D (stored (in, out))."""
    w = m.weight.detach()
    return (w.t() if is_hf_conv1d(m) else w), (None if m.bias is None else m.bias.detach())


def _packed(m: nn.Module, cfg: LlmConfig, backend: str) -> nn.Module:
    cls = FusedConv1DLinear if is_hf_conv1d(m) else FusedLinear
    dtype = cfg.compute_dtype
    held = cfg.weight_dtype if backend == "avx2" else None
    packed = cls(m, dtype, backend, weight_dtype=held)
    packed.orig_dtype = dtype  # the model is cast to dtype: its state_dict says so too
    return packed


def _float_backend(dtype: torch.dtype) -> str:
    """cpuboost's AVX2 kernel for float32 arithmetic where it runs, else oneDNN where it can
    pack ``dtype``, else aten."""
    from cpuboost.kernels import gemm_ops
    if dtype == torch.float32 and gemm_ops():
        return "avx2"
    return "onednn" if onednn_runs(dtype, detect()) else "aten"


def _woq_reason(name: str, m: nn.Module, woq: WoqConfig, head) -> Optional[str]:
    if any(fnmatch.fnmatchcase(name, p) for p in woq.skip):
        return "matches WoqConfig.skip"
    if m is head and not woq.lm_head:
        return "output projection (WoqConfig.lm_head=False)"
    w, _ = _dense(m)
    return why_not_woq(w.shape[0], w.shape[1], woq.bits, woq.group_size)


def linears(model: nn.Module, cfg: LlmConfig, rec: PassRecord) -> None:
    """Each Linear becomes a weight-only quantized linear (``cfg.woq``) or a linear on a
    weight packed for oneDNN. The float weight is released as each layer is replaced."""
    head = _output_projection(model)
    head_w = head._parameters.get("weight") if head is not None else None
    tied = head_w is not None and any(p is head_w for m in model.modules() if m is not head
                                      for p in m.parameters(recurse=False))
    done: dict[str, int] = {}
    dtype = cfg.compute_dtype
    backend = _float_backend(dtype)
    if backend == "aten":
        rec.notes.append(f"oneDNN cannot pack {dtype} weights on this CPU: float linears "
                         "keep a plain weight and run aten's kernel")
    # by name, fetching each module when its turn comes: holding them all in a list would
    # keep every float weight alive until the end (peak memory = float + quantized model)
    for name in [n for n, m in model.named_modules() if is_linear(m)]:
        m = model.get_submodule(name)
        differs = why_not_plain_linear(m) if isinstance(m, nn.Linear) else None
        if differs:  # replacing it would change what the model computes
            rec.skip(name, f"kept as it is: {differs}")
            continue
        reason = _woq_reason(name, m, cfg.woq, head) if cfg.woq else None
        if cfg.woq and reason is None:
            w, b = _dense(m)
            new = WoqLinear.from_float(w, b, cfg.woq.bits, cfg.woq.group_size,
                                       cfg.woq.symmetric, dtype)
            kind = cfg.woq.name + (" on cpuboost's AVX2 kernel (float32 activations)"
                                   if new.on_avx2 else "")
        else:
            chosen = backend if _dense(m)[0].shape[1] else "aten"  # the kernel needs K > 0
            new = _packed(m, cfg, chosen)
            held = str(new.weight_dtype).replace("torch.", "")
            kind = {"avx2": f"{held} weights on cpuboost's AVX2 kernel",
                    "onednn": f"packed {held}"}.get(chosen, f"plain {held} (aten)")
            if cfg.woq:
                rec.skip(name, f"kept float ({reason})")
        replace_module(model, m, new)
        del m
        done[kind] = done.get(kind, 0) + 1
    for kind, n in done.items():
        rec.apply(f"{n} linear layers -> {kind}")
    if tied:
        rec.notes.append("the output projection shares its weight with the input embedding; "
                         "its packed/quantized copy is held beside the embedding table")
