"""IPEX's spelling `ipex.cpu.runtime.*`: `cpuboost.cpu.runtime` is `cpuboost.runtime`."""
from cpuboost import runtime

__all__ = ["runtime"]
