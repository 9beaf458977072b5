"""Ahead-of-time export for deployment: ``cpuboost.export`` and ``cpuboost.load``.

``export`` captures the model with ``torch.export``, compiles it with AOTInductor inside the
cpuboost backend's settings (freezing, oneDNN-packed weights) and writes one file: a ZIP holding

* ``model.pt2`` — the AOTInductor package (compiled C++ and the weights as constants);
* ``cpuboost.json`` — what it was built with and for: format, cpuboost/torch/Python versions,
  CPU architecture, Inductor's vector ISA and the CPU features, the dtype and the dtype of the
  arithmetic (bf16 may mean bf16 weights with float32 arithmetic), what the graph passes did,
  the inputs it accepts (batch dimension dynamic or not), the SHA-256 of ``model.pt2``, and the
  numerics check run at export.

``load`` reads and checks the metadata *before* loading any compiled code, so a package built for
another torch, cpuboost or CPU, or a damaged file, raises :class:`~cpuboost.errors.PackageError`
instead of crashing (a .so built for AVX-512 dies with SIGILL on an AVX2 machine) or computing
something wrong. The loaded model needs neither the model's Python code nor ``transformers``:
outputs come back as tensors, tuples and plain dicts.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import platform
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cpuboost import kernels
from cpuboost.checks import as_call, bf16_weights_only, check_model, emulated_bf16, run_sample
from cpuboost.config import BF16_WEIGHTS_NAME
from cpuboost.errors import ExportError, PackageError, UnsupportedDtypeError
from cpuboost.hw import detect
from cpuboost.nn.int8 import plain_int8_weights
from cpuboost.verify import compare

FORMAT = 1
_META, _PT2 = "cpuboost.json", "model.pt2"
_DTYPES = {None: "float32", torch.float32: "float32", torch.bfloat16: "bfloat16"}
_RTOL = {"float32": 1e-3, "bfloat16": 5e-2}  # the export check, as max|diff| / max|reference|


def _plain(out: Any) -> Any:
    """Outputs as builtin containers: a loading process may not have the model's classes
    (a Hugging Face ``ModelOutput`` is a dict subclass)."""
    if isinstance(out, dict):
        return {k: _plain(v) for k, v in out.items() if v is not None}
    if isinstance(out, (tuple, list)):
        return tuple(_plain(v) for v in out)
    return out


class _Entry(nn.Module):
    """What is exported: ``forward(args, kwargs)`` -> plain outputs, under autocast for bf16
    arithmetic (``dtype`` set)."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype]):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, args: tuple, kwargs: dict):
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return _plain(self.model(*args, **kwargs))


def _describe(value: Any, batch_dim: bool) -> dict:
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        if batch_dim:
            shape[0] = None
        return {"tensor": True, "dtype": str(value.dtype).replace("torch.", ""), "shape": shape}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"tensor": False, "value": value}
    raise ExportError(f"an input of type {type(value).__name__} cannot be exported; pass "
                      "tensors (and plain bool/int/float/str/None values) as example_inputs.")


def _batch_plan(args: tuple, kwargs: dict, dynamic: bool):
    """Which tensor inputs carry the batch: those whose dim 0 equals the first tensor's."""
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    if not dynamic or not tensors or tensors[0].dim() == 0:
        return None
    batch = tensors[0].shape[0]
    return lambda v: isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch


def _traced_inputs(args, kwargs, carries, max_batch: int):
    """Dynamic shapes for torch.export, and inputs to trace with. A batch of 1 cannot be
    traced as dynamic (torch specializes size-1 dims), so such inputs are traced repeated
    twice along the batch dim."""
    from torch.export import Dim
    if carries is None:
        return args, kwargs, None
    batch = Dim("batch", min=1, max=max_batch)

    def widen(v):
        return torch.cat([v, v]) if carries(v) and v.shape[0] == 1 else v

    def spec(v):
        return {0: batch} if carries(v) else None

    t_args, t_kwargs = tuple(widen(v) for v in args), {k: widen(v) for k, v in kwargs.items()}
    specs = (tuple(spec(v) for v in args), {k: spec(v) for k, v in kwargs.items()})
    return t_args, t_kwargs, specs


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def _cpu_record() -> dict:
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    hw = detect()
    return {"machine": platform.machine(), "model": hw.model_name, "features": sorted(hw.flags),
            "vec_isa": str(pick_vec_isa())}


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *,
           dynamic_batch: bool = True, dtype: Optional[torch.dtype] = None,
           max_batch: int = 4096) -> Path:
    """Compile ``model`` ahead of time into the package file ``path``; returns its path.

    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments.
    ``dynamic_batch``: dim 0 of every tensor input whose dim 0 equals the first tensor's may vary
    (1..``max_batch``); all other dims are fixed. ``dtype=torch.bfloat16`` compiles under CPU
    autocast (outputs in autocast's dtypes) where the CPU has bf16 instructions; on CPUs without
    them where cpuboost's AVX2 kernel runs, the linears hold bf16 weights and multiply in float32
    and everything else stays float32 (as ``optimize(dtype=torch.bfloat16)`` does there);
    elsewhere bf16 is emulated, with a warning. The package is checked against the eager model
    on ``example_inputs`` before it is written; a mismatch raises instead of writing it.
    """
    check_model(model, "cpuboost.export")
    if dtype not in _DTYPES:
        raise UnsupportedDtypeError(f"dtype={dtype} cannot be exported; use None (fp32) or "
                                    "torch.bfloat16.")
    dtype_name = _DTYPES[dtype]
    call = as_call(example_inputs)
    args, kwargs = call
    weights_only = bf16_weights_only(dtype, detect())  # bf16 weights, float32 arithmetic
    autocast = dtype_name == "bfloat16" and not weights_only
    if autocast:
        emulated_bf16(dtype, detect())
    entry = _Entry(model, torch.bfloat16 if autocast else None)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = run_sample(model, call)
    carries = _batch_plan(args, kwargs, dynamic_batch)
    # kwargs as an ordered list: the compiled code takes its inputs flattened in this order
    inputs = {"args": [_describe(v, bool(carries and carries(v))) for v in args],
              "kwargs": [dict(_describe(v, bool(carries and carries(v))), name=k)
                         for k, v in kwargs.items()]}
    t_args, t_kwargs, specs = _traced_inputs(args, kwargs, carries, max_batch)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), plain_int8_weights(model):
            program = torch.export.export(entry, (t_args, t_kwargs), dynamic_shapes=specs,
                                          strict=False)
    except Exception as e:
        hint = (" If the model's code depends on the batch size, export with dynamic_batch=False."
                if carries else "")
        raise ExportError(f"torch.export could not capture the model: {type(e).__name__}: "
                          f"{_first_line(e)}.{hint}") from e
    with tempfile.TemporaryDirectory(prefix="cpuboost-export-") as tmp:
        pt2, passes = _compile(program, Path(tmp) / _PT2,
                               torch.bfloat16 if weights_only else torch.float32)
        seconds = time.perf_counter() - t0
        blob = pt2.read_bytes()
    ops = _own_ops(blob)
    meta = {
        "format": FORMAT,
        "cpuboost": _cpuboost_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_record(),
        "dtype": dtype_name,
        "arithmetic": "bfloat16" if autocast else "float32",
        "dynamic_batch": carries is not None,
        "max_batch": max_batch if carries is not None else None,
        "inputs": inputs,
        "cpuboost_ops": ops,
        "cpuboost_op_schemas": {op: _schema(op) for op in ops},
        "graph_passes": passes,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "compile_seconds": round(seconds, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["verified"] = _verify(model, ExportedModel(_load_runner(blob, str(path), meta), meta,
                                                    str(path)),
                               call, reference, carries, dtype_name, autocast)
    return _write(Path(path), meta, blob)


def _verify(model, loaded: "ExportedModel", call, reference, carries, dtype_name: str,
            autocast: bool) -> dict:
    """Run the package the way ``load`` will, on the example and (dynamic batch) on one more
    row, against the eager model; a mismatch raises and nothing is written."""
    args, kwargs = call
    cases = [(call, reference)]
    if carries is not None:
        grow = lambda v: torch.cat([v, v[:1]]) if carries(v) else v  # noqa: E731
        bigger = (tuple(grow(v) for v in args), {k: grow(v) for k, v in kwargs.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cases.append((bigger, run_sample(model, bigger)))
    worst = None
    for (a, k), ref in cases:
        check = compare(_plain(ref), loaded(*a, **k), _RTOL[dtype_name])
        if not check.passed:
            raise ExportError(f"the compiled package differs from the eager model ({check}) on "
                              f"inputs of batch {_batch_of(a, k)}; nothing was written. Please "
                              "report this with the model.")
        worst = check if worst is None or check.max_rel > worst.max_rel else worst
    return {"max_abs_diff": worst.max_abs, "max_rel_diff": worst.max_rel, "rtol": worst.rtol,
            "batches": [_batch_of(a, k) for (a, k), _ in cases]}


def _batch_of(args, kwargs):
    first = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() else None


def _compile(program, target: Path, weight_dtype: torch.dtype) -> tuple[Path, dict]:
    """AOTInductor inside the backend's settings, Linear packing included: on AVX2 CPUs the
    linears of any model (not only an optimized one) run cpuboost's kernel, holding
    ``weight_dtype`` weights. Also returns what the graph passes did."""
    import torch._inductor
    import torch._inductor.config as inductor_config
    from cpuboost.compile.backend import packing_scope
    # Weights in a blob of the package, not inside the .so: the .so has STB_GNU_UNIQUE symbols
    # (libstdc++'s), so glibc never unloads it, and every load() of a package kept its weights
    # mapped for good (96 MB per load of a 96 MB model; now ~1 MB: the code)
    blob = {"aot_inductor.package_constants_on_disk_format": "binary_blob",
            "aot_inductor.package_constants_in_so": False}
    try:  # freezing applies only with grad off
        with packing_scope(weight_dtype) as linear_pass, torch.no_grad(), \
                inductor_config.patch(blob):
            path = Path(torch._inductor.aoti_compile_and_package(program,
                                                                 package_path=str(target)))
    except Exception as e:
        raise ExportError(f"AOTInductor could not compile the exported model: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    return path, {"linears_on_cpuboost_kernel": linear_pass.own,
                  "linears_on_onednn": linear_pass.replaced,
                  "linears_on_weights_shared_with_an_embedding": linear_pass.shared,
                  "conv_weights_packed_for_dynamic_batch": linear_pass.convs_packed,
                  "conv_weights_left_plain": linear_pass.convs_plain,
                  "convs_on_cpuboost_winograd": linear_pass.winograd}


def _write(path: Path, meta: dict, blob: bytes) -> Path:
    """Written next to ``path`` and renamed into place: a crash never leaves half a package."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_META, json.dumps(meta, indent=2, sort_keys=True))
            zf.writestr(_PT2, blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cpuboost_version() -> str:
    from cpuboost import __version__
    return __version__


def _release(version: str) -> tuple[int, ...]:
    base = version.split("+")[0]
    parts = []
    for p in base.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _check_compatible(meta: dict, where: str) -> None:
    rebuild = "re-export it on this machine with cpuboost.export"
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise PackageError(f"{where} has package format {fmt!r}; this cpuboost reads format "
                           f"{FORMAT} and older: upgrade cpuboost, or {rebuild}.")
    built, here = meta.get("torch", "?"), torch.__version__
    if _release(built) != _release(here):
        raise PackageError(f"{where} was built with torch {built}; this process has torch {here}. "
                           f"Compiled packages only run on the torch they were built with: "
                           f"install torch=={built.split('+')[0]} (CPU build), or {rebuild}.")
    ours = _cpuboost_version()
    if _release(meta.get("cpuboost", "?"))[:2] != _release(ours)[:2]:
        raise PackageError(f"{where} was built with cpuboost {meta.get('cpuboost')}; this is "
                           f"cpuboost {ours}: install that version, or {rebuild}.")
    cpu, now = meta.get("cpu", {}), _cpu_record()
    if cpu.get("machine") != now["machine"]:
        raise PackageError(f"{where} was built for {cpu.get('machine')} CPUs; this one is "
                           f"{now['machine']}: {rebuild}.")
    missing = sorted(set(cpu.get("features", [])) - set(now["features"]))
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    isa_ok = cpu.get("vec_isa") in {str(i) for i in valid_vec_isa_list()} | {now["vec_isa"]}
    if missing or not isa_ok:
        what = ", ".join(missing) if missing else f"the {cpu.get('vec_isa')} vector ISA"
        raise PackageError(f"{where} was built for a CPU with {what}, which this CPU "
                           f"({now['model'] or now['machine']}) lacks; running it could crash "
                           f"(illegal instruction): {rebuild}.")


# cpuboost's ops a package may call (through the dispatcher), and why each cannot run here
# (asking loads the op's library where it can run)
# a package exported where the AVX2 kernels run (no AVX-512) runs them on any CPU that can,
# AVX-512 servers included
_OWN_OPS = {**{f"cpuboost::{name}": kernels.library_unavailable for name in (
    "linear", "linear_scaled", "pack_linear_weight", "linear_u8s8", "pack_u8s8_weight",
    "quantize_u8", "conv3x3_winograd", "attention_f32")},
    "cpuboost::attention": kernels.unavailable}


def _own_ops(blob: bytes) -> list[str]:
    """The cpuboost ops the package calls, so that ``load`` loads their library first: the
    generated code names every op it calls, whether the exported program called it (an
    optimized model's linears on the AVX2 kernel) or Inductor's passes put it in."""
    with zipfile.ZipFile(io.BytesIO(blob)) as package:
        files = [package.read(info) for info in package.infolist() if not info.is_dir()]
    named = re.compile(rb"cpuboost::\w+")  # whole names: attention is not attention_f32
    called = {m.decode() for f in files for m in named.findall(f)}
    return sorted(op for op in _OWN_OPS if op in called)


def _schema(op: str) -> str:
    namespace, name = op.split("::")
    return str(getattr(getattr(torch.ops, namespace), name).default._schema)


def _load_own_ops(meta: dict, where: str) -> None:
    """Load the library of each cpuboost op the package calls, and check that the op still takes
    the arguments the compiled code passes (compiled code calling a changed op would crash)."""
    schemas = meta.get("cpuboost_op_schemas") or {}
    for op in meta.get("cpuboost_ops") or []:
        unavailable = _OWN_OPS.get(op)
        why = unavailable() if unavailable else "this cpuboost has no such op"
        if why:
            raise PackageError(f"{where} runs cpuboost's kernel {op}, which cannot run here "
                               f"({why}): export the model on this machine, or export the "
                               "model as it was before cpuboost.optimize.")
        if op in schemas and schemas[op] != _schema(op):
            raise PackageError(f"{where} calls {schemas[op]}, but this cpuboost's op is "
                               f"{_schema(op)}: re-export the model with this cpuboost.")


def _load_runner(blob: bytes, where: str, meta: dict):
    import torch._inductor
    _load_own_ops(meta, where)
    try:
        return torch._inductor.aoti_load_package(io.BytesIO(blob))
    except Exception as e:
        raise PackageError(f"{where}: the compiled model inside could not be loaded "
                           f"({type(e).__name__}: {str(e)[:200]}); re-export it.") from e


class ExportedModel:
    """A loaded package. Call it like the original model; inputs are checked against the shapes
    and dtypes it was built for, so a wrong input raises instead of reaching compiled code."""

    def __init__(self, runner, metadata: dict, where: str):
        self._runner, self.metadata, self.path = runner, metadata, where

    def __call__(self, *args, **kwargs):
        spec = self.metadata["inputs"]
        names = [w["name"] for w in spec["kwargs"]]
        if len(args) != len(spec["args"]) or set(kwargs) != set(names):
            raise TypeError(f"{self.path} takes {len(spec['args'])} positional input(s) and keyword "
                            f"input(s) {names}; got {len(args)} positional and {sorted(kwargs)}.")
        for name, value, want in ([(f"positional {i}", v, w) for i, (v, w) in
                                   enumerate(zip(args, spec["args"]))] +
                                  [(w["name"], kwargs[w["name"]], w) for w in spec["kwargs"]]):
            self._check_input(name, value, want)
        with torch.no_grad():  # keyword inputs in the order they were traced in
            return self._runner(args, {k: kwargs[k] for k in names})

    def _check_input(self, name: str, value, want: dict) -> None:
        if not want["tensor"]:
            if value != want["value"]:
                raise ValueError(f"input {name} was fixed to {want['value']!r} at export; got "
                                 f"{value!r}. Re-export with the value you need.")
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {name} must be a tensor, got {type(value).__name__}.")
        dtype = str(value.dtype).replace("torch.", "")
        shape = want["shape"]
        ok = dtype == want["dtype"] and value.dim() == len(shape) and all(
            s is None or s == n for s, n in zip(shape, value.shape))
        batch_ok = not shape or shape[0] is not None or (
            1 <= value.shape[0] <= self.metadata["max_batch"])
        if not ok or not batch_ok:
            expect = ["batch" if s is None else s for s in shape]
            raise ValueError(f"input {name}: the package was built for {want['dtype']} of shape "
                             f"{expect} (batch 1..{self.metadata.get('max_batch')}); got {dtype} "
                             f"of shape {list(value.shape)}. Re-export for other shapes.")

    def __repr__(self) -> str:
        m = self.metadata
        dtype = BF16_WEIGHTS_NAME if (m["dtype"], m.get("arithmetic")) == (
            "bfloat16", "float32") else m["dtype"]
        return (f"ExportedModel({self.path!r}, {dtype}, dynamic_batch={m['dynamic_batch']}, "
                f"torch {m['torch']}, built for {m['cpu']['vec_isa']})")


def load(path: str | os.PathLike) -> ExportedModel:
    """Load a package written by :func:`export`. Raises :class:`PackageError` (before any
    compiled code is loaded) for a missing, truncated or corrupted file, or one built for
    another torch/cpuboost version or for CPU features this machine lacks."""
    where = str(path)
    if not Path(path).is_file():
        raise PackageError(f"no package file at {where}.")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {_META, _PT2} <= names:
                raise PackageError(f"{where} is a ZIP file but not a cpuboost package (it has "
                                   f"{sorted(names)[:5]}); write packages with cpuboost.export.")
            meta = json.loads(zf.read(_META))
            if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), dict):
                raise ValueError("metadata is not a cpuboost package description")
            _check_compatible(meta, where)
            blob = zf.read(_PT2)  # zipfile checks each member's CRC-32 as it reads
    except PackageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError,
            TypeError, AttributeError) as e:  # unreadable, or metadata of the wrong shape
        raise PackageError(f"{where} is truncated or corrupted ({type(e).__name__}: "
                           f"{str(e)[:120]}); copy it again or re-export it.") from e
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise PackageError(f"{where}: the compiled model does not match the checksum recorded at "
                           "export (the file was altered); copy it again or re-export it.")
    return ExportedModel(_load_runner(blob, where, meta), meta, where)
