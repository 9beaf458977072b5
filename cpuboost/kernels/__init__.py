"""cpuboost's own C++ kernels, for what a profile showed torch has no fast kernel for.

``attention.cpp``: scaled dot-product attention for the short sequences of encoder models (see
its header). Built on first use with the C++ compiler Inductor uses anyway (``$CXX`` or ``c++``)
against the installed torch, cached under ``~/.cache/cpuboost/kernels`` (``$CPUBOOST_CACHE``) by
a hash of the source, torch's version and the flags; loaded as the op ``cpuboost::attention``.
No build at install time, so the install never needs torch's headers or a build backend that
could pull another torch. Where it cannot run (no AVX512-BF16, not x86, no compiler) the callers
keep torch's kernels; ``unavailable()`` says why.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("attention.cpp")
_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw",
          "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-w"]
_why: list[str] = []


def unavailable() -> str | None:
    """Why the attention kernel is not used on this machine, or None when it is."""
    return None if attention_op() is not None else (_why[0] if _why else "not loaded")


@functools.cache
def attention_op():
    """``torch.ops.cpuboost.attention.default``, or None where it cannot run."""
    from cpuboost.hw import detect
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            "avx512_bf16" not in detect().flags:
        _why.append("the CPU has no AVX512-BF16")
        return None
    try:
        torch.ops.load_library(str(_built()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why.append(f"the kernel did not build or load: {str(e).strip()[-300:]}")
        return None
    _register_fake()
    return torch.ops.cpuboost.attention.default


def _built() -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cxx = os.environ.get("CXX", "c++")
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), torch.__version__, cxx, abi,
                                    *_FLAGS]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("CPUBOOST_CACHE", Path.home() / ".cache" / "cpuboost"))
    target = root / "kernels" / f"attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    libs = library_paths()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name  # built aside, then renamed: other processes never see half
        cmd = [cxx, *_FLAGS, abi, *[f"-I{p}" for p in include_paths()], str(_SOURCE), "-o",
               str(out), *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
               "-lc10", "-ltorch_cpu", "-ltorch"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)
    return target


def _register_fake() -> None:
    @torch.library.register_fake("cpuboost::attention")
    def _(q, k, v, mask, scale):
        b, h, n, d = q.shape
        return q.new_empty((b, n, h, d)).transpose(1, 2)

