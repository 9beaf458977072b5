"""Save and load a weight-only quantized LLM without pickle and without the float model.

A checkpoint is a directory with ``model.safetensors`` (int8 weights / int4 nibbles, scales and
zero points of every quantized layer, the float rest, and the buffers a model computes at
construction, such as rotary frequencies) and ``cpuboost_llm.json`` (the transformers config
and class, dtype, which layers are quantized and how, versions, and the tensor file's size and
SHA-256, so a truncated or altered file is refused).

``load_quantized(path)`` builds the architecture on the meta device (no memory, no random
initialization), puts empty quantized layers where the file has them, and assigns the file's
tensors: the model never exists in full precision, and each weight is held once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from cpuboost._files import check_digest, dedup_tensors, file_digest, read_manifest
from cpuboost.config import BF16_WEIGHTS_NAME
from cpuboost.errors import InvalidModelError, PackageError
from cpuboost.llm.config import WoqConfig, woq_activation_dtype
from cpuboost.nn.woq import WoqLinear
from cpuboost.passes import replace_module
from cpuboost.report import report_of

FORMAT = "cpuboost-llm-woq"
VERSION = 1
TENSORS, MANIFEST = "model.safetensors", "cpuboost_llm.json"
BUFFER = "__buffer__."  # prefix of non-persistent buffers stored so meta-built models get them


def save_quantized(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the model ``cpuboost.llm.optimize`` returned to the directory ``path``."""
    from safetensors.torch import save_file
    report = report_of(model)  # raises a clear error for a model optimize() did not return
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise InvalidModelError("save_quantized needs a transformers model (one with a "
                                f".config); got {type(model).__name__}.")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    layers = {n: {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
                  "in_features": m.in_features, "out_features": m.out_features,
                  "bias": m.has_bias}
              for n, m in model.named_modules() if isinstance(m, WoqLinear)}
    tensors = dict(model.state_dict())
    persistent = set(tensors)
    for name, buf in model.named_buffers():
        if name not in persistent:
            tensors[BUFFER + name] = buf
    tensors, aliases = dedup_tensors(tensors)
    save_file(tensors, str(out / TENSORS))
    import transformers
    import cpuboost
    manifest = {
        "format": FORMAT, "version": VERSION, "class": type(model).__name__,
        "config_class": type(config).__name__, "config": config.to_dict(),
        # the dtype asked for: load_quantized optimizes the loaded model in it again
        "dtype": "bfloat16" if report.dtype == BF16_WEIGHTS_NAME else report.dtype,
        "woq_layers": layers, "aliases": aliases,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "cpuboost": cpuboost.__version__},
        "tensors": {"file": TENSORS, **file_digest(out / TENSORS)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return out


def load_quantized(path: Union[str, Path], model_ctor: Optional[Callable] = None,
                   max_seq_len: Optional[int] = None) -> nn.Module:
    """The model saved at ``path``, ready to generate. ``model_ctor(config)`` builds the
    architecture when it is not a transformers class (it is called on the meta device)."""
    import cpuboost.llm
    path = Path(path)
    manifest = _read_manifest(path)
    dtype = getattr(torch, manifest["dtype"])
    model = _skeleton(manifest, model_ctor, dtype, path)
    for name, spec in manifest["woq_layers"].items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise PackageError(f"{path}: the file has a quantized layer {name!r} that the "
                               "model built from its config does not have.") from None
        shell = WoqLinear(spec["in_features"], spec["out_features"], spec["bits"],
                          spec["group_size"], spec["symmetric"], spec["bias"],
                          woq_activation_dtype(spec["bits"], dtype))
        replace_module(model, target, shell)
    tensors = _read_tensors(path, manifest)
    buffers = {k[len(BUFFER):]: tensors.pop(k) for k in list(tensors) if k.startswith(BUFFER)}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    for name, buf in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf
    del tensors
    _check_complete(model, result, path)
    model.eval()
    woq = next(iter(manifest["woq_layers"].values()), None)
    fast = cpuboost.llm.optimize(model, dtype=dtype, inplace=True, max_seq_len=max_seq_len)
    rec = report_of(fast).record("load")
    kind = WoqConfig(bits=woq["bits"], group_size=woq["group_size"]).name if woq else "float"
    rec.apply(f"{len(manifest['woq_layers'])} {kind} layer(s) loaded from {path}")
    return fast


def _read_manifest(path: Path) -> dict:
    return read_manifest(path, MANIFEST, FORMAT, VERSION, "cpuboost LLM checkpoint",
                         "cpuboost.llm.save_quantized")


def _read_tensors(path: Path, manifest: dict) -> dict:
    file = path / TENSORS
    check_digest(file, manifest["tensors"], "cpuboost.llm.save_quantized")
    from safetensors import safe_open
    with safe_open(str(file), framework="pt") as f:  # one allocation per tensor: each is
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # aligned and becomes the model's
    for alias, source in manifest["aliases"].items():
        tensors[alias] = tensors[source]
    return tensors


def _skeleton(manifest: dict, model_ctor, dtype: torch.dtype, path: Path) -> nn.Module:
    import transformers
    config_cls = getattr(transformers, manifest["config_class"], None)
    if config_cls is None:
        raise PackageError(f"{path}: config class {manifest['config_class']!r} is not in this "
                           f"transformers ({transformers.__version__}).")
    config = config_cls.from_dict(manifest["config"])
    if model_ctor is None:
        model_ctor = getattr(transformers, manifest["class"], None)
        if model_ctor is None:
            raise PackageError(f"{path}: {manifest['class']!r} is not a transformers class; "
                               "pass model_ctor=<a function building it from a config>.")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_ctor(config)
    finally:
        torch.set_default_dtype(previous)
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"model_ctor returned {type(model).__name__}, not an nn.Module.")
    return model


def _check_complete(model: nn.Module, result, path: Path) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left or result.unexpected_keys:
        raise PackageError(
            f"{path} does not match the model built from its config: not in the file "
            f"{left[:5]}, not in the model {sorted(result.unexpected_keys)[:5]}.")
