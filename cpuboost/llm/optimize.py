"""`cpuboost.llm.optimize`: validate, copy modules (not weights) unless inplace, run the
rewrites, report. ``generate()`` and ``forward`` keep working unchanged."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Optional, Union

import torch
from torch import nn

from cpuboost._memory import release_freed_memory
from cpuboost.checks import BF16_WEIGHTS_NOTE, bf16_weights_only, check_model, emulated_bf16
from cpuboost.errors import ConfigError, NumericsError, UnsupportedRequestError
from cpuboost.hw import detect
from cpuboost.llm import check as probing
from cpuboost.llm import rewrites
from cpuboost.llm.cache import use_preallocated_cache
from cpuboost.llm.config import LlmConfig, WoqConfig, woq_activation_dtype, woq_config
from cpuboost.llm.structure import structure_of
from cpuboost.nn.woq import WoqLinear
from cpuboost.passes import weight_bytes
from cpuboost.report import OptimizationReport, attach

API = "cpuboost.llm.optimize"


def optimize(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
             quantization: Union[None, str, WoqConfig] = None, inplace: bool = False,
             max_seq_len: Optional[int] = None, *, beam_cache: bool = True,
             graph_mode: bool = False, check: bool = True, quantization_config=None,
             optimizer=None, device: str = "cpu", deployment_mode: bool = True,
             low_precision_checkpoint=None, **ipex_only) -> nn.Module:
    """Return ``model`` made fast for generation on this CPU (a copy unless ``inplace``).

    ``quantization``: None, ``"woq_int8"``, ``"woq_int4"`` or a `WoqConfig` (IPEX's spelling,
    ``quantization_config=``, is accepted too). The copy shares the tensors no rewrite touches
    with ``model`` (no weight is duplicated); ``inplace=True`` releases each float weight as its
    layer is replaced, so peak memory stays near the model's own size.
    ``check``: compare the result's logits with the original model's on a probe (``check.py``;
    the report's accuracy line gives the figures). Where they differ beyond the tolerance of
    ``dtype``/``quantization``, cpuboost's attention rewrites are undone; if that does not fix
    it, `NumericsError` is raised.
    ``cpuboost.report_of(result)`` lists what was applied, skipped and why.
    """
    check_model(model, API)
    _check_ipex_arguments(optimizer, device, low_precision_checkpoint, ipex_only)
    if quantization is not None and quantization_config is not None:
        raise ConfigError("pass quantization= or quantization_config= (its IPEX name), not "
                          "both.")
    cfg = LlmConfig(dtype=dtype, woq=woq_config(quantization or quantization_config),
                    inplace=inplace, max_seq_len=max_seq_len, beam_cache=beam_cache,
                    graph_mode=graph_mode)
    hw = detect()
    # with weight-only quantization, only int8 (its layers then run cpuboost's kernel with
    # float32 activations too), and only if the layers already quantized (load_quantized) take
    # float32 activations: aten's int4/int8 kernels ran GPT-2's decode 3x slower than eager
    # fp32 with float32 activations
    woq_ok = (cfg.woq is None or woq_activation_dtype(cfg.woq.bits, cfg.dtype) == torch.float32) \
        and all(m.compute_dtype == torch.float32 for m in model.modules()
                if isinstance(m, WoqLinear))
    if woq_ok and bf16_weights_only(cfg.dtype, hw):
        cfg = dataclasses.replace(cfg, bf16_weights=True)
    # correct everywhere (emulated), just slower: say so, do not refuse
    warning = emulated_bf16(cfg.compute_dtype, hw)
    report = OptimizationReport(dtype=cfg.dtype_name,
                                level=cfg.woq.name if cfg.woq else "llm",
                                hardware=hw.summary())
    report.weight_bytes_before = weight_bytes(model)
    if warning:
        report.warnings.append(warning)
    if not deployment_mode:
        report.warnings.append("deployment_mode=False has no effect: cpuboost does not trace")
    probe, want, unchecked, t0 = None, None, "check=False", time.perf_counter()
    if check:  # the original's logits, before any rewrite
        probe, unchecked = probing.make_probe(model)
        if probe is not None:
            want, unchecked = probing.reference(model, probe)
    reference_seconds = time.perf_counter() - t0
    if not cfg.inplace:
        model = _copy_modules(model)
    attention_before = getattr(getattr(model, "config", None), "_attn_implementation", None)

    def verify(rec) -> None:
        if want is None:
            rec.skip("numerics", f"not checked: {unchecked}")
            report.accuracy = f"not checked ({unchecked})"
            return
        _verify(model, cfg, report, rec, probing.Checked(probe, want, attention_before))
        rec.notes.append(f"the original model ran the probe in {reference_seconds:.2f}s (before "
                         "the rewrites; this step's time is the optimized model's)")

    _run(model, cfg, report, verify)
    release_freed_memory()
    report.weight_bytes_after = weight_bytes(model)
    attach(model, report)
    return model


def _run(model: nn.Module, cfg: LlmConfig, report: OptimizationReport, verify) -> None:
    rec = report.record("structure")
    rec.notes += structure_of(model).lines()
    if cfg.bf16_weights:
        rec.notes.append(BF16_WEIGHTS_NOTE if cfg.woq is None else (
            f"{cfg.woq.name} on a CPU without bf16 instructions: the int8 layers take float32 "
            "activations on cpuboost's AVX2 kernel; float linears left unquantized hold bf16 "
            "weights there; everything else stays float32"))
    state = {"beams": False}
    if cfg.graph_mode:  # Inductor packs and fuses; transformers' own cache (traceable)
        steps = [("cast", lambda r: rewrites.cast_floats(model, cfg, r)),
                 ("attention", lambda r: rewrites.use_sdpa(model, r)),
                 ("check", verify),  # the eager rewrites; graphs compile on the first call
                 ("graph_mode", lambda r: _compile(model, cfg, r))]
    else:
        steps = [("linears", lambda r: rewrites.linears(model, cfg, r)),
                 ("cast", lambda r: rewrites.cast_floats(model, cfg, r)),
                 ("attention", lambda r: rewrites.use_sdpa(model, r)),
                 ("decode_attention", lambda r: _attention(model, r)),
                 ("beam_cache", lambda r: state.update(beams=_beam_cache(model, cfg, r))),
                 ("kv_cache", lambda r: _kv_cache(model, cfg, r, state["beams"])),
                 ("check", verify)]
    for name, step in steps:
        rec = report.record(name)
        t0 = time.perf_counter()
        with torch.no_grad():
            step(rec)
        rec.seconds = time.perf_counter() - t0


def _verify(model: nn.Module, cfg: LlmConfig, report: OptimizationReport, rec,
            checked: "probing.Checked") -> None:
    """The optimized model against the original's logits (below the floor: against the same
    model computed plainly, check.py); failing, cpuboost's attention rewrites are undone and it
    is judged again; still failing: NumericsError."""
    verdict, plain = _judge(model, cfg, checked)
    if not verdict.passed and _undo_attention(model, checked.attention):
        why = f"the check failed with it: {verdict}"
        for name in ("attention", "decode_attention", "beam_cache"):
            undone = report.pass_named(name)
            if undone is not None and undone.applied:
                undone.dropped = why
        rec.notes.append(f"with cpuboost's attention rewrites: {verdict}; undone, "
                         f"attention back to {checked.attention!r}")
        verdict, _ = _judge(model, cfg, checked, plain)
    report.accuracy = str(verdict)
    if not verdict.passed:
        kept = ("the model was changed in place (inplace=True): reload it" if cfg.inplace
                else "your model is unchanged")
        raise NumericsError(
            f"{API}: {verdict}. {kept}. Narrow it down with quantization=None or "
            "dtype=torch.float32, or accept the result with check=False; please report it "
            "with the model's config.")
    rec.apply(str(verdict))
    if not verdict.met_floor:
        asked = cfg.woq.name if cfg.woq else cfg.dtype_name
        report.warnings.append(
            f"{asked} changes this model's logits more than expected ({verdict.figures()}); "
            "cpuboost computes what was asked (the plain computation agrees), so the loss is "
            "the precision's: evaluate the model's quality, or ask for more bits (woq_int8, "
            "a smaller int4 group_size, WoqConfig.skip for sensitive layers).")
    if cfg.graph_mode:
        rec.notes.append("the eager model before compilation; the compiled graphs are not "
                         "compared")


def _judge(model: nn.Module, cfg: LlmConfig, checked: "probing.Checked", plain=None):
    """(verdict, the plain computation's logits if they were needed)."""
    got = probing.outputs(model, checked.probe)
    verdict = probing.compare(checked.want, got, checked.probe,
                              probing.floor_db(cfg, checked.want.dtype))
    if verdict.met_floor or verdict.error is not None:
        return verdict, plain
    if plain is None:
        plain = probing.plain_outputs(model, checked.probe, checked.attention)
        if isinstance(plain, str):  # (else the message would blame the optimized model)
            plain = f"the plain computation failed ({plain})"
    verdict.plain = probing.compare(plain, got, checked.probe, probing.plain_floor_db(cfg))
    return verdict, plain


def _undo_attention(model: nn.Module, attention: Optional[str]) -> bool:
    """cpuboost's attention rewrites taken back (the beam prefill, the attention function);
    whether there was any."""
    from cpuboost.llm import beam
    undone = isinstance(model.__dict__.get("forward"), beam.BeamPrefill)
    if undone:
        del model.__dict__["forward"]
    config = getattr(model, "config", None)
    if attention is not None and getattr(config, "_attn_implementation", None) != attention:
        model.set_attn_implementation(attention)
        undone = True
    return undone


def _compile(model: nn.Module, cfg: LlmConfig, rec) -> None:
    from cpuboost.compile.graph_mode import SHAPE_POLICY, CompiledForward
    model.__dict__["forward"] = CompiledForward(model, cfg.compute_dtype, rec, cfg.weight_dtype,
                                                release_weights=cfg.inplace)
    rec.notes += ["forward (what generate() calls each step) compiles on its first call",
                  SHAPE_POLICY]


def _attention(model: nn.Module, rec) -> None:
    """Decode steps through cpuboost's attention function (where the model dispatches through
    transformers' attention interface with SDPA)."""
    from cpuboost.llm import attention
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        rec.skip("decode attention", "attention is not SDPA through transformers' interface")
        return
    attention.register()
    model.set_attn_implementation(attention.NAME)
    rec.apply("decode steps: query heads sharing a key/value head attend as that head's rows "
              "(grouped-query models), fp32 softmax(QK^T)V from "
              f"{attention.MATH_FROM} cached positions otherwise (attention 'cpuboost_sdpa')")


def _beam_cache(model: nn.Module, cfg: LlmConfig, rec) -> bool:
    """Beam search keeps the prompt's KV once per request: needs cpuboost's attention function
    in effect, then a probe step that matches the plain cache. Returns whether it is used."""
    from cpuboost.llm import attention, beam
    if not cfg.beam_cache:
        rec.skip("beam search", "beam_cache=False")
        return False
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != attention.NAME:
        rec.skip("beam search", "attention is not SDPA through transformers' interface: "
                                "beams keep a full cache each (reordered by copying)")
        return False
    why_not = beam.probe(model)
    if why_not:
        rec.skip("beam search", f"{why_not}: beams keep a full cache each")
        return False
    model.__dict__["forward"] = beam.BeamPrefill(model)
    rec.apply("beam search: the prompt is computed and its keys/values held once per request; "
              "reordering beams permutes a path table, keys and values never move")
    return True


def _kv_cache(model: nn.Module, cfg: LlmConfig, rec, beams: bool) -> None:
    if use_preallocated_cache(model, cfg.max_seq_len, beam_cache=beams):
        size = f"{cfg.max_seq_len} tokens" if cfg.max_seq_len else "each call's total length"
        rec.apply(f"generate() uses a preallocated KV cache ({size}; no per-token copy)")
    else:
        rec.skip(type(model).__name__, "no transformers generate(): KV cache left as is")


def _copy_modules(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _check_ipex_arguments(optimizer, device, low_precision_checkpoint, extra) -> None:
    if optimizer is not None:
        raise UnsupportedRequestError(
            f"{API} prepares inference; training with an optimizer is not supported. Call it "
            "without optimizer= on a model in eval() mode.")
    if device != "cpu":
        raise UnsupportedRequestError(f"{API} optimizes for the CPU; got device={device!r}.")
    if low_precision_checkpoint is not None:
        raise UnsupportedRequestError(
            "low_precision_checkpoint (GPTQ/AWQ weights) is not supported; load the float "
            "model and pass quantization='woq_int4', or load a checkpoint saved by "
            "cpuboost.llm.save_quantized with cpuboost.llm.load_quantized.")
    accepted = {"qconfig_summary_file", "sym_quant_output", "cache_weight_for_large_batch"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ConfigError(f"{API} got unexpected argument(s) {unknown}.")
    if any(extra.get(k) for k in accepted):
        raise UnsupportedRequestError(
            f"{sorted(k for k in accepted if extra.get(k))}: IPEX static-int8 LLM options are "
            "not supported by cpuboost.llm.optimize; use quantization='woq_int8'.")
