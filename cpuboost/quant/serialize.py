"""Save and load int8 models without pickle: a directory holding ``model.safetensors`` (every
tensor: int8 weights and scales, and the float rest) and ``quantization.json`` (what each
int8 layer is, which BatchNorms are folded and which activations fused, the recipe, versions,
and the tensor file's size and SHA-256, so a truncated or altered file is refused).

``load_quantized(model_ctor, path)`` builds the float architecture with ``model_ctor()``
(its weights are replaced, so random initialization is fine), then swaps in the int8 layers
and loads the rest. A mismatch between the file and the architecture is a clear error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from cpuboost._files import check_digest, dedup_tensors, file_digest, read_manifest
from cpuboost.errors import InvalidModelError, PackageError
from cpuboost.nn import FoldedBatchNorm
from cpuboost.nn.folded import fold_into
from cpuboost.nn.embedding import Int8Embedding, Int8EmbeddingBag, _Int8Table
from cpuboost.nn.int8 import Int8Conv, Int8Linear, QuantizedWeight, _Int8
from cpuboost.nn.int8_shared import share_input
from cpuboost.nn.postops import POST_OPS
from cpuboost.passes import replace_module
from cpuboost.passes.fuse_pointwise import FusedAway
from cpuboost.passes.transformer_layers import ModularTransformerEncoderLayer
from cpuboost.quant.layers import Bf16Layer, bf16_module, kind_of
from cpuboost.quant.recipe import Recipe
from cpuboost.report import OptimizationReport, attach, report_of

FORMAT = "cpuboost-int8-model"
VERSION = 1
TENSORS, MANIFEST = "model.safetensors", "quantization.json"


def _rnn_classes() -> tuple:
    import torch.ao.nn.quantized.dynamic as nnqd
    return (nnqd.LSTM, nnqd.GRU)


def _rnn_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """A dynamic int8 LSTM/GRU's weights as plain tensors: int8 values, scales, zero points."""
    wb = m._weight_bias()
    out = {f"{k}.bias": b for k, b in wb["bias"].items() if b is not None}
    for k, w in wb["weight"].items():
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        out[f"{k}.int8"] = w.int_repr()
        out[f"{k}.scales"] = (w.q_per_channel_scales() if per_channel
                              else torch.tensor([w.q_scale()], dtype=torch.float64))
        out[f"{k}.zero_points"] = (w.q_per_channel_zero_points() if per_channel
                                   else torch.tensor([w.q_zero_point()]))
    return out


def _rnn_from(tensors: dict, prefix: str, floating: nn.Module, per_channel: bool) -> nn.Module:
    from cpuboost.quant.layers import int8_rnn
    q = int8_rnn(floating, per_channel)
    params = {}
    for key in [k[len(prefix):-len(".int8")] for k in tensors
                if k.startswith(prefix) and k.endswith(".int8")]:  # weight_ih_l0, ...
        q8, scales, zps = (tensors[f"{prefix}{key}.{x}"]
                           for x in ("int8", "scales", "zero_points"))
        params[key] = (torch._make_per_channel_quantized_tensor(q8, scales, zps, 0) if per_channel
                       else torch._make_per_tensor_quantized_tensor(q8, float(scales[0]),
                                                                    int(zps[0])))
        bias = key.replace("weight", "bias")  # bias_ih_l0, ...
        params[bias] = tensors.get(f"{prefix}{bias}.bias")
    q.set_weight_bias(params)  # the int8 weights exactly as saved (no re-quantization)
    return q


def save_quantized(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the int8 ``model`` (returned by quantize/autotune) to the directory ``path``."""
    recipe = getattr(report_of(model), "recipe", None)
    if recipe is None:
        raise InvalidModelError("save_quantized takes a model returned by cpuboost.quantize "
                                "or autotune; this one carries no quantization recipe.")
    from safetensors.torch import save_file
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    rnn = _rnn_classes()
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, (_Int8, _Int8Table) + rnn)}
    tensors = {f"{n}.{k}": t for n, m in int8.items()
               for k, t in (_rnn_tensors(m) if isinstance(m, rnn) else m.tensors()).items()}
    tensors.update({k: v for k, v in model.state_dict().items() if not _inside(k, int8)})
    tensors, aliases = dedup_tensors(tensors)
    save_file(tensors, str(out / TENSORS))
    manifest = {
        "format": FORMAT, "version": VERSION, "torch": torch.__version__,
        "int8": {n: {"kind": "rnn", "per_channel": _rnn_per_channel(m)} if isinstance(m, rnn)
                 else m.describe() for n, m in int8.items()},
        # BatchNorms folded into an int8 layer; one folded into a float layer (a
        # ConvTranspose) is saved unfolded by that layer's state_dict and loads as a plain BN
        "folded_bn": {n: _name_of(model, m.__dict__.get("_producer"))
                      for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)
                      and isinstance(m.__dict__.get("_producer"), (_Int8, Bf16Layer))},
        # Linear/Conv kept in bf16 (their weights are in the tensors, under <name>.inner.*)
        "bf16": [n for n, m in model.named_modules() if isinstance(m, Bf16Layer)],
        "fused_away": {n: {"op": m.what, "into": m.fused_into}
                       for n, m in model.named_modules() if isinstance(m, FusedAway)},
        "modular_layers": [n for n, m in model.named_modules()
                           if isinstance(m, ModularTransformerEncoderLayer)],
        "aliases": aliases, "recipe": recipe.to_json(),
        "tensors": {"file": TENSORS, **file_digest(out / TENSORS)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _inside(key: str, layers) -> bool:
    """Whether a state_dict key belongs to one of the int8 layers (named in ``layers``)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))


def _rnn_per_channel(m: nn.Module) -> bool:
    w = next(iter(m._weight_bias()["weight"].values()))
    return w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)


def _name_of(model: nn.Module, target) -> str:
    return next((n for n, m in model.named_modules() if m is target), "")


def load_quantized(model_ctor: Callable[[], nn.Module], path: Union[str, Path]) -> nn.Module:
    """The int8 model saved at ``path``, built on the architecture ``model_ctor()`` returns."""
    manifest, tensors = _read(Path(path))
    model = model_ctor()
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"model_ctor returned {type(model).__name__}, not an nn.Module.")
    model.eval()
    for name in manifest["modular_layers"]:
        _module(model, name, path).__class__ = ModularTransformerEncoderLayer
    rnns, groups = [], {}
    for name, spec in manifest["int8"].items():
        floating = _module(model, name, path)
        if spec["kind"] == "rnn":
            if type(floating) not in (nn.LSTM, nn.GRU):
                raise PackageError(f"{path}: layer {name!r} is an int8 LSTM/GRU in the file but "
                                   f"a {type(floating).__name__} in the model model_ctor builds.")
            rnns.append((name, floating, spec))  # swapped after loading: its packed params
            continue  # cannot take part in load_state_dict
        if spec["kind"] in ("embedding", "embedding_bag"):
            layer = _int8_table(name, spec, floating, tensors, path)
        else:
            layer = _int8_layer(name, spec, tensors, path)
            _check_shape(name, floating, layer, path)
            if spec.get("input_group") is not None:
                groups.setdefault(spec["input_group"], []).append(layer)
        replace_module(model, floating, layer)
    for group, layers in groups.items():  # siblings quantizing their common input once
        try:
            share_input(layers, group)
        except ValueError as e:
            raise PackageError(f"{path}: {e}; the file was altered or is damaged.") from None
    for name in manifest.get("bf16", []):  # before loading: their weights load into them
        floating = _module(model, name, path)
        if kind_of(floating) not in ("linear", "conv"):
            raise PackageError(f"{path}: layer {name!r} is a bf16 Linear/Conv in the file but "
                               f"a {type(floating).__name__} in the model model_ctor builds.")
        replace_module(model, floating, bf16_module(floating))
    rest = {k: tensors[manifest["aliases"].get(k, k)] for k in
            list(tensors) + list(manifest["aliases"]) if not _inside(k, manifest["int8"])}
    result = model.load_state_dict(rest, strict=False)
    for name, floating, spec in rnns:
        replace_module(model, floating, _rnn_from(tensors, f"{name}.", floating,
                                                  spec["per_channel"]))
    for bn_name, producer in manifest["folded_bn"].items():  # after loading their statistics
        fold_into(_module(model, bn_name, path), _module(model, producer, path))
    for name, fused in manifest["fused_away"].items():
        replace_module(model, _module(model, name, path), FusedAway(fused["op"], fused["into"]))
    expected_missing = {k for k in result.missing_keys if _inside(k, manifest["int8"])}
    if set(result.missing_keys) - expected_missing or result.unexpected_keys:
        raise PackageError(
            f"{path} does not match the model model_ctor builds: missing "
            f"{sorted(set(result.missing_keys) - expected_missing)[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}. Pass the constructor of the architecture "
            "that was quantized.")
    report = OptimizationReport("int8 (loaded)", "O1", "")
    report.recipe = Recipe.from_json(manifest["recipe"], f"{path}/{MANIFEST}")
    report.record("load").applied.append(f"{len(manifest['int8'])} int8 layer(s) from {path}")
    attach(model, report)
    return model


def _read(path: Path) -> tuple[dict, dict]:
    manifest = read_manifest(path, MANIFEST, FORMAT, VERSION, "cpuboost int8 model",
                             "save_quantized")
    file = path / TENSORS
    check_digest(file, manifest["tensors"], "save_quantized")
    from safetensors.torch import load_file
    return manifest, load_file(str(file))


def _module(model: nn.Module, name: str, path) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise PackageError(f"{path} has a layer {name!r} that the model model_ctor builds does "
                           "not have; pass the constructor of the architecture that was "
                           "quantized.") from None


def _check_shape(name: str, floating: nn.Module, layer: _Int8, path) -> None:
    w = getattr(floating, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise PackageError(f"{path}: layer {name!r} is a {type(floating).__name__} in the model "
                           "model_ctor builds, not a Linear/Conv.")
    shape = tuple(layer.qweight.shape)
    if tuple(w.shape) not in (shape, shape[::-1]):  # transformers' Conv1D stores (in, out)
        raise PackageError(f"{path}: layer {name!r} has weight shape {shape} in the file but "
                           f"{tuple(w.shape)} in the model model_ctor builds.")


def _int8_table(name: str, spec: dict, floating: nn.Module, tensors: dict, path) -> _Int8Table:
    kind = {"embedding": nn.Embedding, "embedding_bag": nn.EmbeddingBag}[spec["kind"]]
    packed = tensors.get(f"{name}.packed_weight")
    if type(floating) is not kind or packed is None or tuple(packed.shape) != (
            floating.num_embeddings, floating.embedding_dim + 8):
        raise PackageError(f"{path}: table {name!r} does not match the model model_ctor builds "
                           f"({type(floating).__name__}, file rows x bytes "
                           f"{None if packed is None else tuple(packed.shape)}).")
    table = (Int8EmbeddingBag if kind is nn.EmbeddingBag else Int8Embedding)(floating)
    table._w = packed
    return table


def _int8_layer(name: str, spec: dict, tensors: dict, path) -> _Int8:
    try:
        weight = QuantizedWeight(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"])
        bias = tensors.get(f"{name}.bias")
    except KeyError as e:
        raise PackageError(f"{path}: the tensors of int8 layer {name!r} are missing "
                           f"({e}).") from None
    act = None if spec["dynamic"] else (spec["input_scale"], spec["input_zero_point"])
    common = dict(qmax=spec["qmax"], per_channel=spec["per_channel"],
                  post_op=POST_OPS[spec["post_op"]])
    if spec["kind"] == "linear":
        layer = Int8Linear(weight, bias, act, smooth=tensors.get(f"{name}.smooth"), **common)
    else:
        shape = spec.get("input_shape")
        layer = Int8Conv(weight, bias, act, spec["stride"], spec["padding"], spec["dilation"],
                         spec["groups"], input_shape=None if shape is None else tuple(shape),
                         **common)
    out_q = spec.get("output_qparams")
    layer.out_q = None if out_q is None else (float(out_q[0]), int(out_q[1]))
    return layer


__all__ = ["load_quantized", "save_quantized"]
