"""`cpuboost.llm`: fast generation for transformers causal LMs (docs/llm.md)."""
try:
    import transformers.cache_utils  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("cpuboost.llm needs transformers 5: pip install 'cpuboost[llm]'") from e

from cpuboost.llm.cache import PreallocatedCache
from cpuboost.llm.checkpoint import load_quantized, save_quantized
from cpuboost.llm.config import LlmConfig, WoqConfig
from cpuboost.llm.optimize import optimize

__all__ = ["LlmConfig", "PreallocatedCache", "WoqConfig", "load_quantized", "optimize",
           "save_quantized"]
