"""Calibration: run the user's data through the model with an observer on the input of every
layer to be quantized.

``calib_data`` may be
* an iterable of inputs (a list, a DataLoader, a generator): each item is passed to the model
  like ``sample_input`` is to ``optimize`` — a tensor, a tuple of positional arguments, or a
  dict of keyword arguments;
* a callable ``calib_data(model)`` that calls the model itself (for DataLoaders yielding
  ``(input, label)`` pairs: ``lambda m: [m(x) for x, _ in loader]``).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch
from torch import nn

from cpuboost.checks import as_call
from cpuboost.errors import CalibrationError, ConfigError
from cpuboost.quant.observers import Observer


class CalibrationData:
    def __init__(self, calib_data: Any, example_inputs: Any = None):
        self.example = None if example_inputs is None else as_call(example_inputs)
        self.func: Optional[Callable] = None
        self.items = None
        self._first = None  # first item of a one-shot iterator (still calibrated on)
        if calib_data is None:
            pass
        elif callable(calib_data) and not isinstance(calib_data, nn.Module):
            self.func = calib_data
        elif isinstance(calib_data, (torch.Tensor, dict)):
            self.items = [calib_data]  # one batch
        else:
            try:
                it = iter(calib_data)
            except TypeError:
                raise ConfigError(
                    f"calib_data is a {type(calib_data).__name__}; pass a list (or DataLoader, or "
                    "generator) of model inputs, or a function that calls the model.") from None
            self.items = calib_data
            if it is calib_data:  # a one-shot iterator: keep the item peeked at
                self._first = next(it, None)
                self.items = [] if self._first is None else itertools.chain([self._first], it)

    @property
    def given(self) -> bool:
        return self.func is not None or self.items is not None

    def first_call(self) -> Optional[tuple[tuple, dict]]:
        """The call whose dataflow and outputs stand for the model: example_inputs, else the
        first calibration item (None for a callable without example_inputs)."""
        if self.example is not None:
            return self.example
        if self.items is None:
            return None
        first = self._first if self._first is not None else next(iter(self.items), None)
        return None if first is None else as_call(first)

    def run(self, model: nn.Module) -> None:
        with torch.no_grad():
            if self.func is not None:
                self.func(model)
                return
            for item in self.items:
                args, kwargs = as_call(item)
                try:
                    model(*args, **kwargs)
                except CalibrationError:
                    raise
                except Exception as e:
                    raise CalibrationError(
                        f"the model raised {type(e).__name__} on a calibration item "
                        f"({_describe(item)}): {e}. Each item is passed like sample_input (a "
                        "tensor, a tuple of positional args or a dict of kwargs); for (input, "
                        "label) batches pass calib_data=lambda m: [m(x) for x, _ in loader]."
                    ) from e


def _describe(item) -> str:
    if isinstance(item, torch.Tensor):
        return f"tensor {tuple(item.shape)}"
    if isinstance(item, (tuple, list)):
        return f"{type(item).__name__} of {len(item)}"
    return type(item).__name__


def observe_inputs(targets: dict[str, nn.Module], make: Callable[[str], Observer]):
    """Forward pre-hooks feeding each target's first tensor input to its observer.
    Returns (observers by name, hook handles)."""
    observers, handles = {}, []
    for name, module in targets.items():
        obs = observers[name] = make(name)

        def hook(mod, args, kwargs, obs=obs):
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                obs.observe(x)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return observers, handles


def observe_outputs(targets: dict[str, nn.Module], make: Callable[[str], Observer]):
    """Forward hooks feeding each target's (float tensor) output to its observer."""
    observers, handles = {}, []
    for name, module in targets.items():
        obs = observers[name] = make(name)

        def hook(mod, args, output, obs=obs):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                obs.observe(output)
        handles.append(module.register_forward_hook(hook))
    return observers, handles
