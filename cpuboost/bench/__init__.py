from cpuboost.bench.zoo import CASES, BenchCase

__all__ = ["CASES", "BenchCase"]
