"""CPU feature detection: decide by feature flags, never by vendor or model name."""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

# /proc/cpuinfo flag -> our name. Arm reports its features under "Features".
_X86_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "avx_vnni": "avx_vnni",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
    "amx_fp16": "amx_fp16",
}
_ARM_FLAGS = {"asimd": "neon", "sve": "sve", "sve2": "sve2", "bf16": "arm_bf16", "i8mm": "i8mm",
              "asimdhp": "arm_fp16"}


@dataclass(frozen=True)
class CpuFeatures:
    arch: str
    model_name: str
    flags: frozenset[str]
    logical_cpus: int
    torch_threads: int
    mkldnn: bool
    mkl: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 GEMMs run in hardware (AVX512-BF16, AMX or Arm BF16), not emulated."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16", "arm_bf16"})

    @property
    def int8_pairs_saturate(self) -> bool:
        """x86 without VNNI: oneDNN multiplies u8 x s8 with vpmaddubsw, which adds each pair of
        neighbouring products (input channels 2i, 2i+1) into a saturating int16 (measured: a
        Linear whose neighbouring int8 weights are 127, 127 fed 255s is off by thousands)."""
        return self.arch in ("x86_64", "AMD64") and not self.flags & {
            "avx512_vnni", "avx_vnni", "amx_int8"}

    @property
    def int8_strided_1x1_wrong(self) -> bool:
        """oneDNN's AVX2 int8 1x1 conv at stride 2 on channels-last input gave wrong, run-to-run
        different results for 8 and 24 input channels (measured on a Zen 3, torch 2.13): assumed
        for every x86 CPU without AVX-512, whose int8 convs take those kernels."""
        return self.arch in ("x86_64", "AMD64") and "avx512" not in self.flags

    @property
    def native_fp16(self) -> bool:
        return bool(self.flags & {"avx512_fp16", "amx_fp16", "arm_fp16"})

    def summary(self) -> str:
        feats = ", ".join(sorted(self.flags)) or "none detected"
        return f"{self.model_name or self.arch} ({self.logical_cpus} cpus; {feats})"


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Hardware") and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


@functools.lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    name, raw = _cpuinfo()
    table = _ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else _X86_FLAGS
    flags = {ours for theirs, ours in table.items() if theirs in raw}
    return CpuFeatures(
        arch=platform.machine(),
        model_name=name,
        flags=frozenset(flags),
        logical_cpus=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        mkldnn=torch.backends.mkldnn.is_available(),
        mkl=torch.backends.mkl.is_available(),
    )


def onednn_runs(dtype: torch.dtype, hw: CpuFeatures) -> bool:
    """Whether torch's oneDNN kernels can run ``dtype`` on this CPU and build (bf16 weight
    packing needs AVX512BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only CPU it raises)."""
    if not hw.mkldnn:
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True
