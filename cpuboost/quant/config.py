"""Typed int8 recipes. IPEX-style qconfig mappings are translated into these in one place
(``cpuboost.quantization``)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

from cpuboost.errors import ConfigError
from cpuboost.quant.observers import OBSERVERS

_GRANULARITY = ("per_channel", "per_tensor")
_BOOLS = ("fuse_activations", "embedding_bag", "embedding", "smooth_quant", "rnn",
          "activation_symmetric")


@dataclass(frozen=True)
class _Int8Options:
    """What static and dynamic int8 share.

    ``skip``: module names (glob patterns allowed) kept in float. ``embedding_bag`` /
    ``embedding``: tables int8 per row (Embedding off: token tables are rarely the cost).
    ``smooth_quant``: SmoothQuant for Linear layers (cpuboost.quant.smooth; needs calibration
    data), ``smooth_alpha`` None = searched per layer. ``rnn``: LSTM/GRU int8 weights with
    per-step dynamic activations.
    """

    weight_granularity: str = "per_channel"
    skip: tuple = ()
    fuse_activations: bool = True
    embedding_bag: bool = True
    embedding: bool = False
    smooth_quant: bool = False
    smooth_alpha: Optional[float] = None
    rnn: bool = True

    def __post_init__(self):
        if self.weight_granularity not in _GRANULARITY:
            raise ConfigError(f"weight_granularity={self.weight_granularity!r}; use one of "
                              f"{_GRANULARITY}.")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ConfigError(f"skip={self.skip!r} must be a tuple of module names or glob "
                              "patterns (e.g. skip=('classifier', 'encoder.layer.0.*')).")
        for name in _BOOLS:
            if not isinstance(getattr(self, name, False), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise ConfigError(f"smooth_alpha={self.smooth_alpha} must lie in (0, 1), or be None "
                              "to search it per layer.")
        object.__setattr__(self, "skip", tuple(self.skip))

    def with_(self, **changes):
        return replace(self, **changes)


@dataclass(frozen=True)
class StaticInt8Config(_Int8Options):
    """Static int8: activation scales fixed by calibration; Linear, Conv1d/2d/3d in int8.

    ``observer``: how the activation range is chosen (see cpuboost.quant.observers):
    ``histogram`` (default, least squared error), ``minmax``, or ``percentile``.
    """

    activation_symmetric: bool = False
    observer: str = "histogram"
    percentile: float = 99.99

    def __post_init__(self):
        super().__post_init__()
        if self.observer not in OBSERVERS:
            raise ConfigError(f"observer={self.observer!r}; use one of {sorted(OBSERVERS)}.")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must lie in (50, 100], e.g. 99.99.")

    @property
    def dynamic(self) -> bool:
        return False


@dataclass(frozen=True)
class DynamicInt8Config(_Int8Options):
    """Dynamic int8: Linear weights in int8, each input quantized with its own range per call.
    Needs no calibration (unless smooth_quant); suits inputs whose range varies."""

    @property
    def dynamic(self) -> bool:
        return True


QuantConfig = Union[StaticInt8Config, DynamicInt8Config]
