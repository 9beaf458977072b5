"""Typed int8 recipes. IPEX-style qconfig mappings are translated into these in one place
(``cpuboost.quantization``)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

from cpuboost.errors import ConfigError
from cpuboost.quant.observers import OBSERVERS

_GRANULARITY = ("per_channel", "per_tensor")


def _check_common(cfg) -> None:
    if cfg.weight_granularity not in _GRANULARITY:
        raise ConfigError(f"weight_granularity={cfg.weight_granularity!r}; use one of "
                          f"{_GRANULARITY}.")
    if isinstance(cfg.skip, str) or not all(isinstance(s, str) for s in cfg.skip):
        raise ConfigError(f"skip={cfg.skip!r} must be a tuple of module names or glob patterns "
                          "(e.g. skip=('classifier', 'encoder.layer.0.*')).")
    for name in ("fuse_activations", "embedding_bag", "embedding", "smooth_quant", "rnn"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name}={getattr(cfg, name)!r} must be True or False.")
    if cfg.smooth_alpha is not None and not 0.0 < cfg.smooth_alpha < 1.0:
        raise ConfigError(f"smooth_alpha={cfg.smooth_alpha} must lie in (0, 1), or be None to "
                          "search it per layer.")


@dataclass(frozen=True)
class StaticInt8Config:
    """Static int8: activation scales fixed by calibration; Linear and Conv1d/2d/3d in int8.

    ``observer``: how the activation range is chosen (see cpuboost.quant.observers):
    ``histogram`` (default, least squared error), ``minmax``, or ``percentile``.
    ``skip``: module names (glob patterns allowed) kept in float.
    """

    weight_granularity: str = "per_channel"
    activation_symmetric: bool = False
    observer: str = "histogram"
    percentile: float = 99.99
    skip: tuple = ()
    fuse_activations: bool = True
    embedding_bag: bool = True  # EmbeddingBag tables int8 per row (sum/mean)
    embedding: bool = False  # Embedding tables too (off: token tables are rarely the cost)
    smooth_quant: bool = False  # SmoothQuant for Linear layers (cpuboost.quant.smooth)
    smooth_alpha: Optional[float] = None  # None: searched per layer
    rnn: bool = True  # LSTM/GRU: int8 weights, per-step dynamic activations

    def __post_init__(self):
        _check_common(self)
        if self.observer not in OBSERVERS:
            raise ConfigError(f"observer={self.observer!r}; use one of {sorted(OBSERVERS)}.")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must lie in (50, 100], e.g. 99.99.")
        if not isinstance(self.activation_symmetric, bool):
            raise ConfigError("activation_symmetric must be True or False.")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def dynamic(self) -> bool:
        return False

    def with_(self, **changes) -> "StaticInt8Config":
        return replace(self, **changes)


@dataclass(frozen=True)
class DynamicInt8Config:
    """Dynamic int8: Linear weights in int8, each input quantized with its own range per call.
    Needs no calibration; suits inputs whose range varies (NLP, recurrent models)."""

    weight_granularity: str = "per_channel"
    skip: tuple = ()
    fuse_activations: bool = True
    embedding_bag: bool = True
    embedding: bool = False
    smooth_quant: bool = False  # needs calibration data (per-channel ranges)
    smooth_alpha: Optional[float] = None
    rnn: bool = True

    def __post_init__(self):
        _check_common(self)
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def dynamic(self) -> bool:
        return True

    def with_(self, **changes) -> "DynamicInt8Config":
        return replace(self, **changes)


QuantConfig = Union[StaticInt8Config, DynamicInt8Config]
