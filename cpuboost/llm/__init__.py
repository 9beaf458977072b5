from cpuboost.llm.cache import PreallocatedCache
from cpuboost.llm.config import LlmConfig, WoqConfig
from cpuboost.llm.optimize import optimize

__all__ = ["LlmConfig", "PreallocatedCache", "WoqConfig", "optimize"]
