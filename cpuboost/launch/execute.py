"""Carry out a Plan: find what the machine has, start every instance bound to its CPUs, copy each
instance's output to a per-instance log file and (prefixed) to the terminal, and return non-zero
if any instance failed."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cpuboost.launch.plan import Instance, Machine, Plan

BIND_ENTRY = Path(__file__).with_name("rank.py")
_LIB_NAMES = {
    "jemalloc": ("libjemalloc.so", "libjemalloc.so.2"),
    "tcmalloc": ("libtcmalloc.so", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
                 "libtcmalloc_minimal.so.4"),
    "iomp": ("libiomp5.so",),
}


def _library_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for prefix in (os.environ.get("CONDA_PREFIX"), sys.prefix, sys.base_prefix):
        if prefix:
            dirs.append(os.path.join(prefix, "lib"))
    dirs += ["/usr/local/lib", "/usr/local/lib64", "/usr/lib64", "/usr/lib"]
    dirs += sorted(glob.glob("/usr/lib/*-linux-gnu")) + sorted(glob.glob("/lib/*-linux-gnu"))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def find_library(kind: str, dirs: list[str] | None = None) -> str | None:
    for d in dirs if dirs is not None else _library_dirs():
        for name in _LIB_NAMES[kind]:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def find_machine() -> Machine:
    dirs = _library_dirs()
    allocators = {k: p for k in ("jemalloc", "tcmalloc") if (p := find_library(k, dirs))}
    return Machine(allocators, find_library("iomp", dirs), shutil.which("numactl"),
                   shutil.which("taskset"))


def python_command(program: str, args: list[str], module: bool, no_python: bool) -> list[str]:
    if no_python:
        return [program, *args]
    return [sys.executable, "-u", *(["-m"] if module else []), program, *args]


def instance_command(plan: Plan, inst: Instance, machine: Machine,
                     command: list[str]) -> list[str]:
    """The full command line of one instance, binding included."""
    if plan.binder == "sched_setaffinity":  # no tool: bind in a tiny entry, then exec
        return [sys.executable, str(BIND_ENTRY), "--cpus", inst.cpulist, "--"] + command
    return plan.binding_command(inst, machine) + command


def log_path(log_dir: str, prefix: str, inst: Instance) -> Path:
    return Path(log_dir) / f"{prefix}_instance_{inst.index}_cpus_{inst.cpulist}.log"


def _pump(proc: subprocess.Popen, tag: str, log, out, lock: threading.Lock) -> None:
    for line in iter(proc.stdout.readline, b""):
        if log is not None:
            log.write(line)
            log.flush()
        with lock:
            out.write(tag + line.decode(errors="replace"))
            out.flush()


def execute(plan: Plan, machine: Machine, command: list[str], log_dir: str | None = None,
            log_prefix: str = "run", out=None) -> int:
    """Start one process per planned instance and wait for all. Returns 0, or the exit code of
    the first instance (by index) that failed."""
    out = out or sys.stdout
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    procs, pumps, logs = [], [], []
    lock = threading.Lock()
    prefixed = len(plan.instances) > 1
    try:
        for inst in plan.instances:
            env = {k: v for k, v in os.environ.items() if k not in plan.unset}
            env.update(plan.instance_env(inst))
            argv = instance_command(plan, inst, machine, command)
            log = open(log_path(log_dir, log_prefix, inst), "wb") if log_dir else None
            logs.append(log)
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            procs.append(proc)
            tag = f"[{inst.index}] " if prefixed else ""
            t = threading.Thread(target=_pump, args=(proc, tag, log, out, lock), daemon=True)
            t.start()
            pumps.append(t)
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    finally:
        for t in pumps:
            t.join(timeout=5)
        for log in logs:
            if log is not None:
                log.close()
    failed = [(inst, c) for inst, c in zip(plan.instances, codes) if c != 0]
    for inst, c in failed:
        where = f"; log: {log_path(log_dir, log_prefix, inst)}" if log_dir else ""
        print(f"cpuboost run: instance {inst.index} (cpus {inst.cpulist}) exited with {c}{where}",
              file=sys.stderr)
    return exit_code(failed[0][1]) if failed else 0


def exit_code(returncode: int) -> int:
    """A shell-style exit status: a child killed by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
