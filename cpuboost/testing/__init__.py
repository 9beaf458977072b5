from cpuboost.testing.toy_models import TOY_MODELS, ToyCase, build_eval

# Prefix of a fresh process's script that makes it a CPU with AVX-512, as far as cpuboost can
# tell: its own models then use oneDNN, not cpuboost's AVX2 kernels (artifacts made on an AVX2
# CPU must still load and run there).
AS_AVX512 = """
import dataclasses, cpuboost.hw
_real = cpuboost.hw.detect()
cpuboost.hw.detect = lambda: dataclasses.replace(_real, flags=_real.flags | {"avx512"})
from cpuboost import kernels
assert not kernels.gemm_ops()
"""

__all__ = ["AS_AVX512", "TOY_MODELS", "ToyCase", "build_eval"]
