from cpuboost.quant.config import DynamicInt8Config, QuantConfig, StaticInt8Config
from cpuboost.quant.quantize import quantize

__all__ = ["DynamicInt8Config", "QuantConfig", "StaticInt8Config", "quantize"]
