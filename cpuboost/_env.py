"""Every environment variable cpuboost reads, declared once, typed."""
import os


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def verbose() -> bool:
    """CPUBOOST_VERBOSE=1 prints the optimization report after every optimize()."""
    return _flag("CPUBOOST_VERBOSE", False)


def results_dir(default: str) -> str:
    """CPUBOOST_RESULTS_DIR overrides where `cpuboost bench` writes its JSON."""
    return os.environ.get("CPUBOOST_RESULTS_DIR") or default
