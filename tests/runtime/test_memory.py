"""keep_freed_memory: glibc's malloc set in-process as `cpuboost run` sets it by environment.
Each case runs in a fresh interpreter (the setting is process-wide and cannot be undone)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# Activations of a few MB freed in another order than allocated: glibc 2.36 faults ~300 pages
# per request by default here, handing the freed blocks back to the OS.
REQUESTS = textwrap.dedent("""
    import resource, sys, torch
    from cpuboost.runtime import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else None
    def request():
        keep = []
        for mb in (12, 3, 12, 3, 1, 12, 6):
            keep.append(torch.ones(mb << 18))
            if len(keep) > 2:
                keep.pop(0)
    request(); request()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        request()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10)
""")


def _run(mode: str, **env) -> tuple[str, float]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", REQUESTS, mode], env=dict(full, **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, float(faults)


def test_kept_memory_is_not_faulted_in_again():
    applied, kept = _run("keep")
    _, stock = _run("stock")
    assert applied == "True"
    assert kept < 16, (kept, stock)
    assert kept <= stock, (kept, stock)


def test_the_users_own_malloc_settings_are_left_alone():
    applied, _ = _run("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert applied == "False"
