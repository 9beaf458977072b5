"""IPEX's spelling `ipex.cpu.runtime.*`: `cpuboost.cpu.runtime` is `cpuboost.runtime`, also as
an import path (``from cpuboost.cpu.runtime import CPUPool``)."""
import sys

from cpuboost import runtime

sys.modules[f"{__name__}.runtime"] = runtime

__all__ = ["runtime"]
