"""Errors a user can cause. Each message says what was found and how to fix it."""


class CpuBoostError(Exception):
    """Base class of every error cpuboost raises on purpose."""


class InvalidModelError(CpuBoostError, TypeError):
    """The object handed to cpuboost is not a usable ``nn.Module``."""


class UnsupportedDeviceError(CpuBoostError, ValueError):
    """Parameters or buffers live somewhere other than the CPU (or on the meta device)."""


class UnsupportedDtypeError(CpuBoostError, ValueError):
    """The requested dtype is not supported, or not by this CPU."""


class TrainingModeError(CpuBoostError, RuntimeError):
    """The model is in training mode but only inference optimization was asked for."""


class SampleInputError(CpuBoostError, ValueError):
    """The model rejected the ``sample_input`` it was given."""


class ConfigError(CpuBoostError, ValueError):
    """Conflicting or invalid options."""


class UnsupportedRequestError(CpuBoostError, RuntimeError):
    """An option was asked for explicitly but cannot be honoured on this model or machine."""


class ExportError(CpuBoostError, RuntimeError):
    """The model could not be exported and compiled ahead of time."""


class PackageError(CpuBoostError, ValueError):
    """A package given to ``cpuboost.load`` is unreadable, damaged, or built for another setup."""


class CalibrationError(CpuBoostError, ValueError):
    """Calibration data could not be used (NaN/inf activations, no batches, wrong format)."""


class NumericsError(CpuBoostError, RuntimeError):
    """The optimized model computes something other than the original, beyond the tolerance of
    what was asked for, and no fallback fixed it."""
