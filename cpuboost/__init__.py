"""cpuboost: make PyTorch models fast on CPUs. Importing it changes nothing in torch."""
from cpuboost.api import optimize
from cpuboost.config import OptimizeConfig
from cpuboost.errors import (ConfigError, CpuBoostError, InvalidModelError, SampleInputError,
                             TrainingModeError, UnsupportedDeviceError, UnsupportedDtypeError,
                             UnsupportedRequestError)
from cpuboost.report import OptimizationReport, report_of

__version__ = "0.1.0"

__all__ = ["ConfigError", "CpuBoostError", "InvalidModelError", "OptimizationReport",
           "OptimizeConfig", "SampleInputError", "TrainingModeError", "UnsupportedDeviceError",
           "UnsupportedDtypeError", "UnsupportedRequestError", "optimize", "report_of"]
