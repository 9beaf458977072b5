"""cpuboost: make PyTorch models fast on CPUs. Importing it changes nothing in torch."""
from cpuboost.api import optimize
from cpuboost.config import OptimizeConfig
from cpuboost.deploy import ExportedModel, export, load
from cpuboost.errors import (CalibrationError, ConfigError, CpuBoostError, ExportError,
                             InvalidModelError, NumericsError, PackageError, SampleInputError,
                             TrainingModeError,
                             UnsupportedDeviceError, UnsupportedDtypeError,
                             UnsupportedRequestError)
from cpuboost.kernels import load_ops
from cpuboost.quant import (DynamicInt8Config, StaticInt8Config, load_quantized, quantize,
                            save_quantized)
from cpuboost.report import OptimizationReport, report_of
from cpuboost import quantization  # noqa: E402  (IPEX's `ipex.quantization.prepare` spelling)

__version__ = "0.1.0"


def __getattr__(name: str):
    # `cpuboost.llm` needs transformers: imported on first use, not by `import cpuboost`
    # `cpuboost.runtime` / IPEX's `cpu.runtime` start nothing until used
    if name in ("llm", "runtime", "cpu"):
        import importlib
        return importlib.import_module(f"cpuboost.{name}")
    raise AttributeError(f"module 'cpuboost' has no attribute {name!r}")

__all__ = ["CalibrationError", "ConfigError", "CpuBoostError", "DynamicInt8Config", "ExportError",
           "ExportedModel", "InvalidModelError", "NumericsError", "OptimizationReport",
           "OptimizeConfig",
           "PackageError", "SampleInputError", "StaticInt8Config", "TrainingModeError",
           "UnsupportedDeviceError", "UnsupportedDtypeError", "UnsupportedRequestError", "cpu",
           "export", "llm", "load", "load_ops", "load_quantized", "optimize", "quantization", "quantize", "report_of",
           "runtime", "save_quantized"]
