from cpuboost.quant.autotune import autotune, recipe_of
from cpuboost.quant.config import DynamicInt8Config, QuantConfig, StaticInt8Config
from cpuboost.quant.quantize import quantize
from cpuboost.quant.recipe import LayerRecipe, Recipe
from cpuboost.quant.serialize import load_quantized, save_quantized

__all__ = ["DynamicInt8Config", "LayerRecipe", "QuantConfig", "Recipe", "StaticInt8Config",
           "autotune", "load_quantized", "quantize", "recipe_of", "save_quantized"]
