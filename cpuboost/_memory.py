"""Process memory helpers."""
import os

# glibc's malloc set to keep freed memory, as jemalloc/tcmalloc do for inference servers. Left
# alone it gives large freed blocks back to the OS and faults them in again, 4 KB at a time, on
# the next request: stock eager ResNet-50 batch 16 took ~410k page faults (1.6 GB) per forward on
# a 2-core Zen 3 VM, 4-13k with these settings, and ran 2121-2236 vs 1348-1421 ms (cpuboost:
# 82k -> 0 faults, 1179-1224 vs 1013-1062 ms). Blocks up to 32 MB (glibc's cap for this knob)
# come from the heap, which is never trimmed; larger ones are still mapped fresh each time. Each
# setting alone made glibc fault more, not less (BERT-base batch 8: 85k and 170k vs 61k).
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
               "MALLOC_TOP_PAD_": str(64 << 20)}
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``). Compiling packs weights into
    temporaries (Inductor packs every fp32 Linear for MKL before the backend repacks the faster
    ones for oneDNN); freed, they would otherwise stay in the process's RSS. No-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> bool:
    """Opt-in and process-wide: set glibc's malloc as ``cpuboost run`` does where neither
    jemalloc nor tcmalloc is installed (see GLIBC_TUNED), for a process not started by it (a
    server that imports cpuboost). Memory then stays at its peak instead of going back to the
    OS. Returns False, changing nothing, where glibc's malloc is not the allocator (another
    libc, or jemalloc/tcmalloc preloaded) or the MALLOC_* variables already configure it."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or set(GLIBC_TUNED) & set(os.environ):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        # mallopt takes an int: the trim threshold is 2 GB here, 64 GB through the environment.
        # Every setting is attempted (they only help as a set); True if glibc took them all.
        took = [libc.mallopt(ctypes.c_int(_MALLOPT[k]), ctypes.c_int(min(int(v), 2**31 - 1)))
                for k, v in GLIBC_TUNED.items()]
        return all(t == 1 for t in took)
    except OSError:
        return False


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
