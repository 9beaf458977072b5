"""A quantization recipe: per layer, int8 (with its input scale and zero point) or float (with
the reason), saved as editable JSON and loaded back (IPEX's qconf_summary idea).

``cpuboost.quantize(model, recipe=...)`` applies a recipe without calibrating again: every layer
marked ``int8`` uses the recorded scale, every other layer stays in float. Edit the JSON to
move a layer to float (``"dtype": "fp32"``) or to change a scale.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from cpuboost.errors import ConfigError
from cpuboost.quant.config import DynamicInt8Config, QuantConfig, StaticInt8Config

FORMAT = "cpuboost-quant-recipe"
VERSION = 1
DTYPES = ("int8", "fp32", "bf16")  # bf16: Linear/Conv only (see quant.layers.Bf16Layer)


@dataclass(frozen=True)
class LayerRecipe:
    kind: str  # "linear" | "conv"
    dtype: str = "int8"  # "int8" | "fp32" | "bf16"
    input_scale: Optional[float] = None  # None: dynamic (computed per call)
    input_zero_point: Optional[int] = None
    observed_range: Optional[tuple[float, float]] = None  # what calibration saw
    sqnr_db: Optional[float] = None  # the layer's own error when it was measured
    reason: str = ""  # why it is float, or how it was decided
    smooth_alpha: Optional[float] = None  # SmoothQuant strength chosen for this layer
    smoothing: Optional[tuple] = None  # its per-input-channel divisor s (see quant.smooth)
    # a conv whose output only residual adds read: the uint8 grid graph mode puts it on
    output_scale: Optional[float] = None
    output_zero_point: Optional[int] = None

    def check(self, name: str, dynamic: bool) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"recipe layer {name!r}: dtype {self.dtype!r}; use one of {DTYPES}.")
        if self.dtype == "bf16" and self.kind not in ("linear", "conv"):
            raise ConfigError(f"recipe layer {name!r}: bf16 applies to Linear/Conv layers; a "
                              f"{self.kind} layer can be int8 or fp32.")
        if self.dtype == "int8" and not dynamic and self.kind not in ("embedding",
                                                                      "embedding_bag", "rnn"):
            _check_qparams(name, "input", self.input_scale, self.input_zero_point)
        if self.output_scale is not None or self.output_zero_point is not None:
            _check_qparams(name, "output", self.output_scale, self.output_zero_point)


def _check_qparams(name: str, which: str, scale, zp) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"recipe layer {name!r}: {which}_scale {scale!r} must be a positive "
                          "finite number.")
    if not (isinstance(zp, int) and 0 <= zp <= 255):
        raise ConfigError(f"recipe layer {name!r}: {which}_zero_point {zp!r} must be an "
                          "integer in 0..255.")


@dataclass(frozen=True)
class Recipe:
    config: QuantConfig
    layers: dict[str, LayerRecipe] = field(default_factory=dict)

    def int8_layers(self) -> list[str]:
        return [n for n, r in self.layers.items() if r.dtype == "int8"]

    def with_float(self, names, reason: str, dtype: str = "fp32") -> "Recipe":
        """This recipe with ``names`` moved to ``dtype`` (fp32, or bf16 where the layer is a
        Linear/Conv) for ``reason``."""
        layers = dict(self.layers)
        for n in names:
            to = dtype if layers[n].kind in ("linear", "conv") else "fp32"
            layers[n] = replace(layers[n], dtype=to, reason=reason)
        return Recipe(self.config, layers)

    def to_json(self) -> dict:
        cfg = asdict(self.config)
        cfg["type"] = type(self.config).__name__
        return {"format": FORMAT, "version": VERSION, "config": cfg,
                "layers": {n: {k: v for k, v in asdict(r).items() if v is not None}
                           for n, r in self.layers.items()}}

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, data: dict, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{source} is not a cpuboost quantization recipe (no "
                              f"'format': {FORMAT!r}).")
        if data.get("version") != VERSION:
            raise ConfigError(f"{source} has recipe version {data.get('version')!r}; this "
                              f"cpuboost reads version {VERSION}.")
        cfg = dict(data.get("config") or {})
        kinds = {"StaticInt8Config": StaticInt8Config, "DynamicInt8Config": DynamicInt8Config}
        kind = kinds.get(cfg.pop("type", None))
        if kind is None:
            raise ConfigError(f"{source}: config type must be one of {sorted(kinds)}.")
        try:
            config = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
            layers = {n: LayerRecipe(**{k: tuple(v) if k in ("observed_range", "smoothing")
                                        else v for k, v in r.items()})
                      for n, r in (data.get("layers") or {}).items()}
        except TypeError as e:
            raise ConfigError(f"{source}: unexpected field ({e}); edit only the values of "
                              "existing fields.") from None
        for n, r in layers.items():
            r.check(n, config.dynamic)
        return cls(config, layers)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Recipe":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the recipe {str(path)!r}: {e}") from None
        return cls.from_json(data, repr(str(path)))
