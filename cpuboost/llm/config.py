"""Typed options of `cpuboost.llm.optimize`; IPEX-style arguments are translated here only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from cpuboost.config import BF16_WEIGHTS_NAME
from cpuboost.errors import ConfigError

INT4_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class WoqConfig:
    """Weight-only quantization: Linear weights in int8 or int4, activations stay float.

    bits: 8 (one scale per output channel, symmetric: what torch's int8 kernel takes) or 4
    (one scale and zero point per ``group_size`` input channels). lm_head: quantize the output
    projection too (the largest single matrix of small models). skip: glob patterns of module
    names kept in float (e.g. ``("model.layers.0.*",)``).
    """
    bits: int = 8
    group_size: int = 0
    symmetric: bool = True
    lm_head: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"WoqConfig.bits must be 8 or 4, got {self.bits!r}.")
        if self.bits == 8 and self.group_size not in (0, -1):
            raise ConfigError(
                f"int8 weight-only quantization is per output channel (torch's int8 kernel has "
                f"one scale per channel); got group_size={self.group_size}. Use group_size=0, "
                "or bits=4 for group-wise scales.")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError("int8 weight-only quantization is symmetric (torch's int8 kernel "
                              "has no zero point); use symmetric=True or bits=4.")
        if self.bits == 4 and self.group_size not in INT4_GROUPS:
            raise ConfigError(f"int4 group_size must be one of {INT4_GROUPS}, got "
                              f"{self.group_size!r}.")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ConfigError(f"WoqConfig.skip must be a tuple of glob patterns, got "
                              f"{self.skip!r}.")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.group_size == -1:
            object.__setattr__(self, "group_size", 0)

    @property
    def name(self) -> str:
        return "woq_int8" if self.bits == 8 else f"woq_int4 (group {self.group_size})"


NAMED = {"woq_int8": WoqConfig(bits=8), "woq_int4": WoqConfig(bits=4, group_size=128,
                                                               symmetric=False)}


def woq_config(quantization: Union[None, str, WoqConfig]) -> Optional[WoqConfig]:
    """``None``, a name from NAMED, or a WoqConfig -> Optional[WoqConfig]."""
    if quantization is None or isinstance(quantization, WoqConfig):
        return quantization
    if isinstance(quantization, str) and quantization in NAMED:
        return NAMED[quantization]
    raise ConfigError(f"quantization must be None, one of {sorted(NAMED)} or a "
                      f"cpuboost.llm.WoqConfig; got {quantization!r}.")


def woq_activation_dtype(bits: int, dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of a weight-only layer of ``bits`` when ``dtype`` is asked for:
    float32 for int8 where bf16 means bf16 weights with float32 arithmetic (cpuboost's AVX2
    kernel takes int8 weights with float32 activations there), else ``dtype``."""
    from cpuboost.checks import bf16_weights_only
    from cpuboost.hw import detect
    return torch.float32 if bits == 8 and bf16_weights_only(dtype, detect()) else dtype


@dataclass(frozen=True)
class LlmConfig:
    """Everything `cpuboost.llm.optimize` decides with. dtype: the float dtype of activations
    and unquantized weights. max_seq_len: the KV cache is preallocated for this many tokens
    (None: for each generate() call's prompt + max_new_tokens)."""
    dtype: torch.dtype = torch.bfloat16
    woq: Optional[WoqConfig] = None
    inplace: bool = False
    max_seq_len: Optional[int] = None
    beam_cache: bool = True  # beam search holds the prompt's KV once per request (beam.py)
    graph_mode: bool = False  # compile forward with the cpuboost backend (float models)
    # bf16 on a CPU without bf16 instructions: float linears hold bf16 weights, arithmetic and
    # every other tensor stay float32 (set by optimize; checks.bf16_weights_only)
    bf16_weights: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.bf16_weights else self.dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        """What float linears on cpuboost's AVX2 kernel hold."""
        return torch.bfloat16 if self.bf16_weights else torch.float32

    @property
    def dtype_name(self) -> str:
        if self.bf16_weights:
            return BF16_WEIGHTS_NAME
        return str(self.dtype).replace("torch.", "")

    def __post_init__(self):
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"cpuboost.llm.optimize runs in torch.float32 or torch.bfloat16; "
                              f"got dtype={self.dtype!r}.")
        if self.graph_mode and self.woq is not None:
            raise ConfigError(
                "graph_mode=True compiles the float model (Inductor packs its weights); "
                "weight-only quantization runs in eager mode. Pass one or the other.")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int)
                                             or self.max_seq_len < 1):
            raise ConfigError(f"max_seq_len must be a positive int or None, got "
                              f"{self.max_seq_len!r}.")
