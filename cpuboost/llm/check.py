"""`cpuboost.llm.optimize`'s numerics check: the optimized model's logits against the original
model's on a probe, so that a rewrite that computes something else (an architecture whose
attention the decode path handles wrongly, a kernel bug) is caught at optimize time, not in a
user's generations.

The probe: two prompts of ``LENGTH`` random tokens (the second left-padded by ``PAD``), a forward
over them with a KV cache, then one decode step on that cache. Compared: the last ``KEEP``
prompt positions and the decode step, by SQNR over both rows (padded positions carry no meaning
and are left out). The original model runs it before the rewrites (it shares its tensors with
the copy, or is the model itself with ``inplace=True``), in its own dtype: that run costs what
the user's model costs (a bf16 model on a CPU without bf16 instructions computes slowly), so
the probe is short. Its decode step attends over fewer than ``attention.MATH_FROM`` cached
positions: the fp32 math path of cpuboost's decode attention (one key head per query head, from
64 positions) is checked by its tests against torch's SDPA, not here.

Below its floor against the original, the result is compared with the model as asked for,
computed plainly: every replaced layer through its ``reference_forward`` (F.linear on the
dequantized or folded weight) and attention through the original implementation. Matching that,
the loss is what the requested precision does to this model (deep random-weight models amplify
weight noise: a 1.1B one lost all but 4 dB to int4), reported, not refused; not matching it,
cpuboost's implementation computes something else.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from cpuboost.llm.cache import cache_argument
from cpuboost.llm.config import LlmConfig
from cpuboost.verify import cosine, sqnr_db

LENGTH = 24
PAD = 4
KEEP = 16


@dataclass
class Probe:
    ids: torch.Tensor  # (2, LENGTH)
    mask: torch.Tensor  # (2, LENGTH), 0 on the second row's padding
    step: torch.Tensor  # (2, 1): the decode step's tokens
    with_mask: bool = True  # the model takes attention_mask (and a batch of 2)


@dataclass
class Logits:
    prompt: torch.Tensor  # (rows, KEEP, vocab) float32
    step: Optional[torch.Tensor]  # (rows, 1, vocab), None where the model keeps no cache
    dtype: torch.dtype = torch.float32  # what the model computed them in


@dataclass
class Checked:
    """What `optimize` compares against: the probe, the original's logits, and the model's
    attention implementation before the rewrites (to go back to)."""
    probe: Probe
    want: Logits
    attention: Optional[str]


@dataclass
class Verdict:
    sqnr: float
    cosine: float
    agree: int  # positions whose top-1 token is the same
    positions: int
    floor: float
    error: Optional[str] = None  # the optimized model failed to run the probe
    plain: Optional["Verdict"] = None  # against the plain computation, when below the floor

    @property
    def met_floor(self) -> bool:
        return self.error is None and self.sqnr >= self.floor  # NaN fails

    @property
    def passed(self) -> bool:
        return self.met_floor or (self.plain is not None and self.plain.met_floor)

    def figures(self) -> str:
        return (f"SQNR {self.sqnr:.1f} dB (at least {self.floor:g} dB required), cosine "
                f"{self.cosine:.5f}, same top-1 token at {self.agree}/{self.positions}")

    def __str__(self) -> str:
        if self.error:
            return f"the optimized model failed on the probe the original ran ({self.error})"
        text = (f"logits vs the original model on a probe ({self.positions} positions of 2 "
                f"random {LENGTH}-token prompts, one left-padded, and a decode step): "
                f"{self.figures()}")
        if self.plain is not None:
            agrees = "agrees" if self.plain.met_floor else "does not agree either"
            text += (f"; the same model computed plainly (replaced layers on their dequantized "
                     f"or folded weights, the original attention) {agrees}: "
                     f"{self.plain.figures() if self.plain.error is None else self.plain.error}")
        return text


def floor_db(cfg: LlmConfig, original_dtype: torch.dtype = torch.float32) -> float:
    """The logits SQNR against the original that a correct result reaches on all but deep
    random-weight models; below it the plain computation decides. On 28 tiny random
    architectures (docs/llm.md, "Numerics check") the lowest were: fp32 110 dB, bf16 weights
    46.6, woq_int8 35.8, woq_int4 (group 32) 13.4. A model held in bf16/fp16 gets the
    low-precision floor whatever ``dtype`` asks for: its own logits, the reference, carry that
    rounding."""
    if cfg.woq is not None:
        return 15.0 if cfg.woq.bits == 8 else 10.0
    # a model held in bf16/fp16 computes its own reference in low precision
    low = cfg.dtype == torch.bfloat16 or original_dtype != torch.float32
    return 15.0 if low else 40.0


def plain_floor_db(cfg: LlmConfig) -> float:
    """Against the plain computation of the same model (same weights, same dtype) only
    arithmetic order and rounding differ."""
    return 40.0 if cfg.woq is None and cfg.dtype == torch.float32 else 15.0


def make_probe(model: nn.Module) -> tuple[Optional[Probe], Optional[str]]:
    """The probe for ``model``, or (None, why not)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        emb = None
    vocab = getattr(emb, "num_embeddings", None)
    if not vocab:
        return None, "the model has no token embedding to feed a probe"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, LENGTH), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return Probe(ids, mask, torch.randint(0, vocab, (2, 1), generator=gen)), None


def _short(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"no logits in the model's output ({type(out).__name__})")
    return logits


def _call(model: nn.Module, probe: Probe) -> Logits:
    ids, mask = (probe.ids, probe.mask) if probe.with_mask else (probe.ids[:1], None)
    extra = {"attention_mask": mask} if mask is not None else {}
    out = model(input_ids=ids, use_cache=True, **extra)
    prompt = _logits(out)[:, -KEEP:]
    dtype, prompt = prompt.dtype, prompt.float()
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        return Logits(prompt, None, dtype)
    step_ids = probe.step if probe.with_mask else probe.step[:1]
    if mask is not None:
        extra["attention_mask"] = torch.cat([mask, torch.ones_like(step_ids)], 1)
    extra[cache_argument(model)] = cache
    out = model(input_ids=step_ids, use_cache=True, **extra)
    return Logits(prompt, _logits(out)[:, -1:].float(), dtype)


def reference(model: nn.Module, probe: Probe) -> tuple[Optional[Logits], Optional[str]]:
    """The original model's logits on the probe, or (None, why it could not run). A model that
    refuses the batch with a mask is probed with the first prompt alone."""
    errors = []
    for with_mask in (True, False):
        probe.with_mask = with_mask
        try:
            with torch.no_grad():
                return _call(model, probe), None
        except Exception as e:  # noqa: BLE001 - any failure means: this probe does not fit
            errors.append(_short(e))
    return None, f"the original model did not run the probe ({errors[-1]})"


def outputs(model: nn.Module, probe: Probe) -> Union[Logits, str]:
    """The optimized model's logits on the probe, or why it failed to run it."""
    try:
        with torch.no_grad():
            return _call(model, probe)
    except Exception as e:  # noqa: BLE001 - reported through the verdict
        return _short(e)


def compare(want: Union[Logits, str], got: Union[Logits, str], probe: Probe,
            floor: float) -> Verdict:
    """``got`` against ``want``; either may be why it could not be computed."""
    for failed in (got, want):
        if isinstance(failed, str):
            return Verdict(-math.inf, math.nan, 0, 0, floor, failed)
    keep = probe.mask[:, -KEEP:].bool() if probe.with_mask else torch.ones(1, KEEP, dtype=bool)
    pairs = [(want.prompt[keep], got.prompt[keep])]
    if want.step is not None and got.step is not None:
        pairs.append((want.step.flatten(0, 1), got.step.flatten(0, 1)))
    elif want.step is not None:
        return Verdict(-math.inf, math.nan, 0, 0, floor, "it returned no key/value cache")
    ref, out = [r for r, _ in pairs], [c for _, c in pairs]
    agree = sum(int((r.argmax(-1) == c.argmax(-1)).sum()) for r, c in pairs)
    return Verdict(sqnr_db(ref, out), cosine(ref, out), agree, sum(r.shape[0] for r in ref),
                   floor)


def plain_outputs(model: nn.Module, probe: Probe, attention: Optional[str]) -> Union[Logits, str]:
    """The optimized model's probe computed plainly: replaced layers through their
    ``reference_forward``, attention through ``attention`` (the original implementation), no
    forward stand-in. Everything is put back afterwards."""
    from cpuboost.nn.fused import FusedLinear
    from cpuboost.nn.woq import WoqLinear
    layers = [m for m in model.modules() if isinstance(m, (WoqLinear, FusedLinear))]
    for m in layers:  # an instance attribute: nn.Module.__call__ finds it before the class's
        m.forward = functools.partial(_plain_forward, m)
    stand_in = model.__dict__.pop("forward", None)  # BeamPrefill
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = attention is not None and current != attention
    try:
        if switch:
            model.set_attn_implementation(attention)
        return outputs(model, probe)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
        if stand_in is not None:
            model.__dict__["forward"] = stand_in
        if switch:
            model.set_attn_implementation(current)


def _plain_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.reference_forward(x).to(x.dtype)
