"""`OptimizeConfig`: the one place IPEX-style keyword arguments become a typed config."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from cpuboost.errors import ConfigError, UnsupportedDtypeError

_LEVELS = ("O0", "O1")
# the report's dtype where bf16 means bf16 weights and float32 arithmetic (checks.bf16_weights_only)
BF16_WEIGHTS_NAME = "bfloat16 weights, float32 arithmetic"
_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
# The boolean passes IPEX exposes as tri-state keyword arguments (None = the level's default).
_PASS_FLAGS = ("conv_bn_folding", "linear_bn_folding", "weights_prepack",
               "replace_dropout_with_identity", "fuse_pointwise")


@dataclass(frozen=True)
class OptimizeConfig:
    """What `cpuboost.optimize` does. Every field has a concrete default (level O1).

    ``explicit`` names the fields the user set on purpose: a default that cannot apply is
    skipped and reported, an explicit request that cannot be honoured raises.
    """

    dtype: Optional[torch.dtype] = None
    level: str = "O1"
    inplace: bool = False
    conv_bn_folding: bool = True
    linear_bn_folding: bool = True
    weights_prepack: bool = True
    replace_dropout_with_identity: bool = True
    fuse_pointwise: bool = True
    graph_mode: bool = False  # compile forward with the cpuboost backend (IPEX's name)
    channels_last: bool = True
    # Time oneDNN vs aten per Linear shape and keep the faster. Off by default: on the bench
    # suite here it changed <1% (only tiny GEMMs differ) and it costs fusion where aten wins.
    measure_kernels: bool = False
    verify: bool = True
    rtol_fp32: float = 1e-4
    rtol_low_precision: float = 5e-2
    # dtype=bfloat16 on a CPU without bf16 instructions where cpuboost's AVX2 kernel runs: the
    # linears hold bf16 weights and compute in float32; nothing else changes dtype (set by
    # optimize, see checks.bf16_weights_only)
    bf16_weights: bool = False
    explicit: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        if self.level not in _LEVELS:
            raise ConfigError(f"level={self.level!r} is not supported; use one of {_LEVELS} "
                              "(O1 turns every measured-helpful pass on, O0 turns them all off).")
        if self.dtype not in _DTYPES:
            raise UnsupportedDtypeError(
                f"dtype={self.dtype} is not supported; use None or torch.float32 (fp32), "
                "torch.bfloat16, or torch.float16.")
        for name in _PASS_FLAGS + ("inplace", "channels_last", "verify", "measure_kernels",
                                   "graph_mode", "bf16_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        if not (0 < self.rtol_fp32 < 1 and 0 < self.rtol_low_precision < 1):
            raise ConfigError("rtol_fp32 and rtol_low_precision must lie in (0, 1).")
        unknown = set(self.explicit) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"explicit names unknown fields {sorted(unknown)}.")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype arithmetic runs in (float32 with bf16_weights)."""
        return torch.float32 if self.bf16_weights else (self.dtype or torch.float32)

    @property
    def low_precision(self) -> bool:
        """Arithmetic in bf16/fp16 (under autocast)."""
        return self.compute_dtype in (torch.bfloat16, torch.float16)

    @property
    def weight_dtype(self) -> torch.dtype:
        """What linears on cpuboost's AVX2 kernel hold."""
        return torch.bfloat16 if self.bf16_weights else torch.float32

    @property
    def rtol(self) -> float:
        """The tolerance outputs are checked against: any low-precision weight counts."""
        low = self.low_precision or self.bf16_weights
        return self.rtol_low_precision if low else self.rtol_fp32

    @property
    def dtype_name(self) -> str:
        if self.bf16_weights:
            return BF16_WEIGHTS_NAME
        return str(self.compute_dtype).replace("torch.", "")

    @classmethod
    def from_ipex(cls, dtype=None, level="O1", inplace=False, graph_mode=None,
                  **flags) -> "OptimizeConfig":
        """Translate ``ipex.optimize``-style arguments. A flag left as None takes the level's
        default: on for O1, off for O0 (as in IPEX)."""
        unknown = set(flags) - set(_PASS_FLAGS)
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}; known: {list(_PASS_FLAGS)}.")
        if level not in _LEVELS:  # checked here too so the message names the argument
            raise ConfigError(f"level={level!r} is not supported; use 'O0' or 'O1'.")
        on_by_default = level == "O1"
        values = {name: on_by_default if flags.get(name) is None else flags[name]
                  for name in _PASS_FLAGS}
        explicit = {name for name in _PASS_FLAGS if flags.get(name) is not None}
        if dtype is not None:
            explicit.add("dtype")
        if graph_mode is not None:
            explicit.add("graph_mode")
        return cls(dtype=dtype, level=level, inplace=inplace, graph_mode=bool(graph_mode),
                   explicit=frozenset(explicit), **values)

    def with_(self, **changes) -> "OptimizeConfig":
        return replace(self, **changes)
