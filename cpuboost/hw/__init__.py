from cpuboost.hw.features import CpuFeatures, detect

__all__ = ["CpuFeatures", "detect"]
