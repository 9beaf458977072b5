"""Process memory helpers."""


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``). Compiling packs weights into
    temporaries (Inductor packs every fp32 Linear for MKL before the backend repacks the faster
    ones for oneDNN); freed, they would otherwise stay in the process's RSS. No-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
