"""Accuracy-aware tuning: int8 everywhere it keeps the user's metric within tolerance, float
for the fewest layers that do not.

1. Quantize with the given config; if ``eval_fn`` is within ``max_relative_loss`` of the float
   model, done (one evaluation).
2. Otherwise rank the int8 layers by sensitivity: on the first calibration input, put each
   layer alone back to float and measure how much closer the model output gets (SQNR gain).
   That costs one forward per layer, no ``eval_fn`` calls.
3. Fall back the k most sensitive layers, k = 1, 2, 4, ... until ``eval_fn`` passes, then
   bisect between the last failing and the first passing k. Each trial reuses the calibrated
   scales (a recipe), so nothing is calibrated twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Union

from torch import nn

from cpuboost.checks import run_sample
from cpuboost.errors import ConfigError, UnsupportedRequestError
from cpuboost.passes import replace_module
from cpuboost.quant.calibrate import CalibrationData
from cpuboost.quant.quantize import (_check_data, convert_model, prepare_model, quantize,
                                     resolve)
from cpuboost.quant.recipe import Recipe
from cpuboost.report import report_of
from cpuboost.verify import sqnr_db


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe a model returned by quantize/autotune was made with (save it with .save)."""
    recipe = report_of(model).recipe
    if recipe is None:
        raise ConfigError("this model was optimized, not quantized: it has no quantization "
                          "recipe.")
    return recipe


def autotune(model: nn.Module, calib_data: Any, eval_fn: Callable[[nn.Module], float],
             max_relative_loss: float = 0.01, config=None, *, example_inputs: Any = None,
             higher_is_better: bool = True, fallback_dtype: str = "fp32",
             save_recipe: Union[str, Path, None] = None) -> nn.Module:
    """The int8 model with the fewest float layers whose ``eval_fn`` score is within
    ``max_relative_loss`` of the float model's (``eval_fn(model) -> float``, higher is better
    unless ``higher_is_better=False``). Layers fall back to ``fallback_dtype``: "fp32", or
    "bf16" (Linear/Conv; others fall back to fp32). Its recipe is ``recipe_of(result)``, also
    written to ``save_recipe`` if given; ``quantize(model, recipe=path)`` rebuilds it."""
    if not 0 <= max_relative_loss < 1:
        raise ConfigError(f"max_relative_loss={max_relative_loss} must lie in [0, 1), e.g. "
                          "0.01 for 1%.")
    if fallback_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"fallback_dtype={fallback_dtype!r}; use 'fp32' or 'bf16'.")
    cfg = resolve(config)
    data = CalibrationData(calib_data, example_inputs)
    _check_data(cfg, data)
    baseline = float(eval_fn(model))

    def loss(score: float) -> float:
        gap = baseline - score if higher_is_better else score - baseline
        return gap / max(abs(baseline), 1e-12)

    best = quantize(model, calib_data, cfg, example_inputs=example_inputs)
    recipe = recipe_of(best)
    trials = [(0, float(eval_fn(best)))]
    if loss(trials[0][1]) > max_relative_loss:
        first = data.first_call()
        order = _ranked(model, recipe, first)
        goal = (eval_fn, loss, max_relative_loss, fallback_dtype)
        best = _search(model, recipe, order, first, goal, trials)
        recipe = recipe_of(best)
    _note(best, baseline, trials, max_relative_loss, loss)
    if save_recipe is not None:
        recipe.save(save_recipe)
    return best


def _ranked(model, recipe: Recipe, first) -> list[str]:
    """int8 layers, most sensitive first: the output SQNR gained by keeping each one float."""
    if first is None:
        raise ConfigError("autotune needs example_inputs= (or calibration items) to rank "
                          "layers by sensitivity.")
    cfg = recipe.config.with_(fuse_activations=False)  # 1:1 swappable int8 <-> float layers
    prepared = prepare_model(model, cfg, first, False, Recipe(cfg, recipe.layers))
    floats = dict(prepared.targets)
    q = convert_model(prepared)
    reference = run_sample(model, first)
    gain = {}
    for name in recipe.int8_layers():
        int8 = q.get_submodule(name)
        replace_module(q, int8, floats[name])
        gain[name] = sqnr_db(reference, run_sample(q, first))
        replace_module(q, floats[name], int8)
    return sorted(gain, key=gain.get, reverse=True)


def _search(model, recipe, order, first, goal, trials) -> nn.Module:
    """Fewest of ``order``'s leading layers to keep float so that ``eval_fn`` passes."""
    eval_fn, loss, tolerance, dtype = goal
    reason = f"autotune: {dtype} keeps the metric within {tolerance:.2%}"
    args, kwargs = first
    example = kwargs if not args else args  # example_inputs as the user would pass it
    made: dict[int, nn.Module] = {}

    def passes(k: int) -> bool:
        made[k] = quantize(model, recipe=recipe.with_float(order[:k], reason, dtype),
                           example_inputs=example)
        trials.append((k, float(eval_fn(made[k]))))
        return loss(trials[-1][1]) <= tolerance

    lo, hi = 0, 1
    while not passes(hi):
        if hi == len(order):
            scores = ", ".join(f"{k} float: {s:.4g}" for k, s in trials)
            raise UnsupportedRequestError(
                f"autotune could not meet max_relative_loss={tolerance} even with every layer "
                f"in float ({scores}); is eval_fn deterministic?")
        lo, hi = hi, min(2 * hi, len(order))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return made[hi]


def _note(model, baseline, trials, tolerance, loss) -> None:
    rec = report_of(model).record("autotune")
    rec.notes.append(f"float model scores {baseline:.6g}; tolerance {tolerance:.2%}")
    for k, score in trials:
        rec.notes.append(f"{k} layer(s) in float: {score:.6g} (loss {loss(score):.2%})")
    rec.applied += [f"{n}: {r.dtype} ({r.reason})" for n, r in recipe_of(model).layers.items()
                    if r.dtype != "int8" and r.reason.startswith("autotune")]


__all__ = ["autotune", "recipe_of"]
