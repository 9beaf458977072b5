from cpuboost.llm.cache import PreallocatedCache
from cpuboost.llm.checkpoint import load_quantized, save_quantized
from cpuboost.llm.config import LlmConfig, WoqConfig
from cpuboost.llm.optimize import optimize

__all__ = ["LlmConfig", "PreallocatedCache", "WoqConfig", "load_quantized", "optimize",
           "save_quantized"]
