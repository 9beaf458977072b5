"""cpuboost's own C++ kernels, for what a profile showed torch has no fast kernel for.

``attention.cpp``: scaled dot-product attention for the short sequences of encoder models (see
its header), loaded as the op ``cpuboost::attention``. ``gemm_avx2.cpp``: fp32 linear layers on
CPUs with AVX2 and FMA but no AVX-512 (``cpuboost::linear`` on float32 or bf16 weights packed by
``cpuboost::pack_linear_weight``; ``cpuboost::linear_scaled`` on int8 ones with per-feature
scales). ``gemm_u8s8_avx2.cpp``: int8 x int8 linear layers for the same CPUs
(``cpuboost::linear_u8s8`` on weights packed by ``cpuboost::pack_u8s8_weight``) and
``cpuboost::quantize_u8``, float32 to uint8 in one pass. ``winograd_avx2.cpp``: fp32 3x3
convolutions by Winograd F(4x4, 3x3) (``cpuboost::conv3x3_winograd`` on weights transformed by
``winograd_pack``). ``attention_avx2.cpp``: fp32 attention (``cpuboost::attention_f32``); these
two share the fp32 GEMM's register tiles (``gemm_tile_avx2.h``). Each is built on first use with the
C++ compiler Inductor uses anyway (``$CXX`` or ``c++``) against the installed torch, cached under
``~/.cache/cpuboost/kernels`` (``$CPUBOOST_CACHE``) by a hash of the source, torch's version and
the flags (the four AVX2 sources side by side: 43 s on a fresh 2-core machine; the first two
alone took 22 s side by side, 38 s one after the other). No build at install time, so the install never needs torch's headers or a build
backend that could pull another torch. Where a kernel cannot run (the CPU lacks its
instructions, not x86, no compiler) the callers keep torch's kernels; ``unavailable()`` and
``gemm_unavailable()`` say why.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

_SOURCE = Path(__file__).with_name("attention.cpp")
_COMMON = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-w"]
_FLAGS = _COMMON + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
_GEMM_SOURCES = [Path(__file__).with_name(n)
                 for n in ("gemm_avx2.cpp", "gemm_u8s8_avx2.cpp", "winograd_avx2.cpp",
                           "attention_avx2.cpp")]
_GEMM_FLAGS = _COMMON + ["-mavx2", "-mfma"]
_why: list[str] = []
# post-op name -> activation code of cpuboost::linear and linear_u8s8 (applied in registers;
# act_avx2.h)
AVX2_ACTS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "tanh": 4, "sigmoid": 5, "silu": 6,
             "hardswish": 7}
_gemm_why: list[str] = []
_library_why: list[str] = []  # why the AVX2 kernels did not load


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
    if not _load(_SOURCE, _FLAGS, _why):
        return None
    _register_fake()
    return torch.ops.cpuboost.attention.default


def gemm_unavailable() -> str | None:
    """Why the AVX2 linear kernel is not used on this machine, or None when it is."""
    return None if gemm_ops() else (_gemm_why + _library_why + ["not loaded"])[0]


def library_unavailable() -> str | None:
    """Why the AVX2 kernels cannot run on this machine (to run a saved trace or package that
    calls them), or None when they can."""
    return None if avx2_library() else (_library_why + ["not loaded"])[0]


@functools.cache
def gemm_ops() -> bool:
    """Whether ``torch.ops.cpuboost.linear`` / ``pack_linear_weight`` are loaded and used. Only
    where the CPU has AVX2 and FMA but no AVX-512: there oneDNN's AVX-512 kernels are the ones to
    use."""
    from cpuboost.hw import detect
    if "avx512" in detect().flags:
        _gemm_why.append("the CPU has AVX-512, where oneDNN's kernels are used")
        return False
    return avx2_library()


@functools.cache
def avx2_library() -> bool:
    """Whether the AVX2 kernels are loaded: wherever the CPU can run them (AVX2 and FMA, AVX-512
    CPUs included), so that a TorchScript trace made where `gemm_ops()` holds also loads and runs
    on a machine whose own models would use oneDNN instead (``load_ops``)."""
    from cpuboost.hw import detect
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _library_why.append("not an x86-64 CPU")
    elif not {"avx2", "fma"} <= detect().flags:
        _library_why.append("the CPU has no AVX2+FMA")
    if _library_why or not _load_all(_GEMM_SOURCES, _GEMM_FLAGS, _library_why):
        return False
    _register_gemm_fakes()
    return True


# bf16 panels hold output feature j (< 8) in slot 2j and j + 8 in slot 2j + 1 of each K step
# (gemm_avx2.cpp, load_weights): this indexes the slots in feature order
_BF16_SLOTS = [2 * j for j in range(8)] + [2 * j + 1 for j in range(8)]


def load_ops() -> list[str]:
    """Load every cpuboost kernel that runs on this CPU; returns the ``cpuboost::`` ops now
    registered with torch. cpuboost loads its kernels when a model first needs them, not at
    import, so a process that only loads a saved TorchScript trace calling them (an optimized
    model traced on an AVX2 CPU without AVX-512) must call this before ``torch.jit.load``.
    Warns where the AVX2 kernels cannot run: torch.jit.load of such a trace would then fail
    with only "Unknown builtin op: cpuboost::...". """
    if not avx2_library():
        import warnings
        warnings.warn(f"cpuboost's AVX2 kernels cannot run here ({library_unavailable()}): a "
                      "TorchScript trace made on an AVX2 CPU without AVX-512 calls them and will "
                      "not load on this machine; trace the model here instead.", RuntimeWarning,
                      stacklevel=2)
    attention_op()
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("cpuboost::"))


def unpack_u8s8(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The [out_features, in_features] int8 weight ``cpuboost::pack_u8s8_weight`` packed into
    ``packed`` ([ceil(N/16), ceil(K/4), 16, 4])."""
    p, g = packed.shape[:2]
    return packed.transpose(1, 2).reshape(p * 16, g * 4)[:out_features, :in_features].contiguous()


def unpack_panels(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The [out_features, K] weight ``cpuboost::pack_linear_weight`` packed into ``packed``
    ([ceil(N/16), K, 16] panels, float32, bf16 or int8), in its own dtype."""
    if packed.dtype == torch.bfloat16:
        packed = packed[:, :, _BF16_SLOTS]
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out_features].contiguous()


# Winograd F(4x4, 3x3): G maps a 3-tap kernel to the 6 transform points (winograd_avx2.cpp)
_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
               (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def winograd_pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in, 3, 3] convolution weight transformed for ``cpuboost::conv3x3_winograd``:
    U = G g G^T (computed in float64, rounded once to float32), 36 [out, in] matrices, each in
    the panels of ``cpuboost::pack_linear_weight`` -> [36, ceil(out/16), in, 16]."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_pack takes a [out, in, 3, 3] weight, got {tuple(weight.shape)}")
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64)
    u = torch.einsum("ik,ockl,jl->ijoc", g, weight.detach().double(), g).reshape(36, *weight.shape[:2])
    return torch.stack([torch.ops.cpuboost.pack_linear_weight(m.float()) for m in u])


def unpack_winograd(packed: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The [out, in, 3, 3] weight ``winograd_pack`` transformed into ``packed``, solved back
    through G's pseudo-inverse (G has full column rank) in float64: within ~1e-7 of the weight
    packed, the float32 rounding of U."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64)
    u = torch.stack([unpack_panels(p, out_channels) for p in packed]).double()
    u = u.reshape(6, 6, *u.shape[1:])
    pinv = torch.linalg.pinv(g)  # G has full column rank: G^+ G = I
    return torch.einsum("ki,ijoc,lj->ockl", pinv, u, pinv).float()


def _load_all(sources: list[Path], flags: list[str], why: list[str]) -> bool:
    """Build the sources side by side (one compiler process each: on a fresh machine the two
    GEMM kernels took ~40 s each one after the other), then load them in order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(sources)) as pool:
        built = [pool.submit(_built, s, flags) for s in sources]
    return all(_load_from(b.result, why) for b in built)  # result(): the path, or the error


def _load(source: Path, flags: list[str], why: list[str]) -> bool:
    return _load_from(lambda: _built(source, flags), why)


def _load_from(path: Callable[[], Path], why: list[str]) -> bool:
    try:
        torch.ops.load_library(str(path()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        why.append(f"the kernel did not build or load: {str(e).strip()[-300:]}")
        return False
    return True


def _built(source: Path, flags: list[str]) -> Path:
    from torch.utils.cpp_extension import include_paths, library_paths
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cxx = os.environ.get("CXX", "c++")
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # included by sources
    key = hashlib.sha256("\0".join([source.read_text(), *headers, torch.__version__, cxx, abi,
                                    *flags]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("CPUBOOST_CACHE", Path.home() / ".cache" / "cpuboost"))
    target = root / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    libs = library_paths()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name  # built aside, then renamed: other processes never see half
        cmd = [cxx, *flags, abi, *[f"-I{p}" for p in include_paths()], str(source), "-o",
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


def _register_gemm_fakes() -> None:
    @torch.library.register_fake("cpuboost::pack_linear_weight")
    def _(weight):
        n, k = weight.shape
        return weight.new_empty(((n + 15) // 16, k, 16))

    @torch.library.register_fake("cpuboost::linear")
    def _(x, packed, bias, out_features, act):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("cpuboost::linear_scaled")
    def _(x, packed, scale, bias, out_features, act):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("cpuboost::pack_u8s8_weight")
    def _(weight):
        n, k = weight.shape
        return weight.new_empty(((n + 15) // 16, (k + 3) // 4, 16, 4))

    @torch.library.register_fake("cpuboost::quantize_u8")
    def _(x, scale, zp, qmax):
        return torch.empty_like(x, dtype=torch.uint8)

    @torch.library.register_fake("cpuboost::linear_u8s8")
    def _(x, packed, w_scale, colsum, bias, out_features, act, x_scale, x_zp, qmax, out_scale,
          out_zp):
        dtype = torch.uint8 if out_scale > 0 else torch.float32
        return x.new_empty((*x.shape[:-1], out_features), dtype=dtype)

    @torch.library.register_fake("cpuboost::conv3x3_winograd")
    def _(x, packed, bias, add, out_channels, padding, act):
        n, _, h, w = x.shape
        shape = (n, out_channels, h + 2 * padding[0] - 2, w + 2 * padding[1] - 2)
        return torch.empty(shape, dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    @torch.library.register_fake("cpuboost::attention_f32")
    def _(q, k, v, mask, scale):
        b, h, lq, d = q.shape
        return q.new_empty((b, lq, h, d)).transpose(1, 2)
