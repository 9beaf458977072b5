"""`cpuboost doctor`: what this machine is, what the installed torch is, what in the environment
fights the hardware, and which cpuboost features will be fast, slow-but-correct or unavailable.

``collect`` takes every input as an argument (defaults read the machine), so tests can feed it a
CUDA build on a GPU-less host, an oversubscribed OMP_NUM_THREADS or an AVX2-only CPU."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Mapping

from cpuboost.hw.features import CpuFeatures, detect
from cpuboost.hw.topology import Topology, format_cpulist, read_topology
from cpuboost.launch.plan import THREAD_VARS, Machine

FAST, SLOW, UNAVAILABLE = "fast", "slow but correct", "unavailable"
ISA_ORDER = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_bf16", "amx_int8", "amx_fp16", "neon", "sve", "sve2", "arm_bf16", "i8mm",
             "arm_fp16")


@dataclass(frozen=True)
class TorchInfo:
    version: str
    cuda: str | None          # CUDA version the build targets, None for a CPU build
    gpu_present: bool
    capability: str           # ATen's CPU kernel level: DEFAULT, AVX2, AVX512, ...
    mkldnn: bool
    onednn_version: str | None
    mkl: bool
    parallel_backend: str     # OpenMP / native
    threads: int
    compiler: str | None      # C++ compiler Inductor would use


def torch_info() -> TorchInfo:
    import torch
    config = torch.__config__.show()
    onednn = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", config)
    backend = re.search(r"ATen parallel backend: (\S+)", torch.__config__.parallel_info())
    gpu = os.path.exists("/dev/nvidia0") or bool(shutil.which("nvidia-smi"))
    return TorchInfo(torch.__version__, torch.version.cuda, gpu,
                     torch.backends.cpu.get_cpu_capability(),
                     torch.backends.mkldnn.is_available(), onednn and onednn.group(1),
                     torch.backends.mkl.is_available(), backend.group(1) if backend else "?",
                     torch.get_num_threads(),
                     os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"))


@dataclass
class Report:
    cpu: dict
    topology: dict
    torch: dict
    tools: dict
    environment: dict
    features: list[dict]
    problems: list[dict] = field(default_factory=list)   # {"level", "message", "fix"}

    @property
    def ok(self) -> bool:
        return not any(p["level"] == "error" for p in self.problems)

    def to_dict(self) -> dict:
        return {"cpu": self.cpu, "topology": self.topology, "torch": self.torch,
                "tools": self.tools, "environment": self.environment,
                "features": self.features, "problems": self.problems, "ok": self.ok}


def _feature_table(f: CpuFeatures, t: TorchInfo, cores: int) -> list[dict]:
    x86 = f.arch.lower() in ("x86_64", "amd64", "i686")
    simd = bool(f.flags & {"avx2", "avx512", "neon"})
    vnni = bool(f.flags & {"avx512_vnni", "avx_vnni", "amx_int8", "i8mm"})
    rows = []

    def row(name, level, why):
        rows.append({"feature": name, "level": level, "why": why})

    own_gemm = x86 and {"avx2", "fma"} <= f.flags and "avx512" not in f.flags
    row("optimize fp32 (packed oneDNN GEMM/conv, folding)", FAST if t.mkldnn and simd else SLOW,
        "oneDNN with " + (t.capability if simd else "no AVX2/AVX-512/NEON: generic kernels") +
        ("; linears and 3x3 convs (Winograd) on cpuboost's AVX2 kernels (built on first use" +
         (f" with {t.compiler})" if t.compiler else ": no C++ compiler found, oneDNN's instead)")
         if own_gemm else ""))
    if f.native_bf16:
        amx = "AMX tiles" if "amx_bf16" in f.flags else "AVX512-BF16" if x86 else "Arm BF16"
        row("bf16 (dtype=torch.bfloat16)", FAST, f"native bf16 dot products ({amx})")
    elif "avx512" in f.flags:
        row("bf16 (dtype=torch.bfloat16)", SLOW, "AVX-512 without BF16: converted to fp32 inside "
            "kernels (halves memory traffic, no faster math)")
    elif own_gemm and t.compiler:
        row("bf16 (dtype=torch.bfloat16)", FAST, "no bf16 instructions: linears hold bf16 "
            "weights and multiply in fp32 on cpuboost's AVX2 kernel (half the weight bytes, fp32 "
            "speed or better); stock autocast bf16 is emulated and slow")
    else:
        row("bf16 (dtype=torch.bfloat16)", SLOW, "no bf16 instructions: emulated, often slower "
            "than fp32")
    row("fp16 (dtype=torch.float16)", FAST if f.native_fp16 else SLOW,
        "native fp16 arithmetic" if f.native_fp16 else "no AVX512-FP16/AMX-FP16: emulated")
    if "amx_int8" in f.flags:
        row("int8 static/dynamic (cpuboost.quantize)", FAST, "AMX-INT8 tiles")
    elif vnni:
        row("int8 static/dynamic (cpuboost.quantize)", FAST, "VNNI int8 dot products")
    elif own_gemm and t.compiler:
        row("int8 static/dynamic (cpuboost.quantize)", FAST, "no VNNI: linears and 1x1 convs "
            "on cpuboost's AVX2 int8 kernel (16-bit multiplies, ~2x fp32's throughput), other "
            "convs on oneDNN's; weights pair-bounded so no int16 sum saturates")
    else:
        row("int8 static/dynamic (cpuboost.quantize)", SLOW if simd else UNAVAILABLE,
            "no VNNI: int8 math through 16-bit multiplies (still smaller than fp32)")
    row("weight-only int8/int4 LLM (cpuboost.llm)", FAST if simd else SLOW,
        "aten weight-only kernels use " + ("AVX-512" if "avx512" in f.flags else
                                           "AVX2" if "avx2" in f.flags else "scalar code"))
    row("graph mode (torch.compile backend, export)", FAST if t.compiler else UNAVAILABLE,
        f"C++ compiler {t.compiler}" if t.compiler else "no C++ compiler found: Inductor needs "
        "one (apt-get install g++)")
    row("multi-stream runtime (cpuboost.runtime)", FAST if cores >= 2 else SLOW,
        f"{cores} usable cores" + ("" if t.parallel_backend == "OpenMP" else
                                   f"; parallel backend {t.parallel_backend}"))
    return rows


def _problems(f: CpuFeatures, topo: Topology, t: TorchInfo, env: Mapping[str, str],
              machine: Machine) -> list[dict]:
    out = []
    cores = len(topo.cores())
    logical = len(topo.usable)

    def add(level, message, fix):
        out.append({"level": level, "message": message, "fix": fix})

    if t.cuda and not t.gpu_present:
        base = t.version.split("+")[0]
        add("error", f"torch {t.version} is a CUDA {t.cuda} build but this machine has no GPU: "
            "several GB of CUDA libraries for nothing, and other packages may have pulled it in "
            "over the CPU build",
            f"pip install --force-reinstall 'torch=={base}' --index-url "
            "https://download.pytorch.org/whl/cpu")
    for var in THREAD_VARS:
        value = env.get(var)
        if value is None:
            continue
        try:
            n = int(value.split(",")[0])
        except ValueError:
            add("warning", f"{var}={value!r} is not a number", f"unset {var}")
            continue
        if n > logical:
            add("warning", f"{var}={n} but only {logical} CPUs are usable: threads oversubscribe "
                "the cores and every parallel region waits for the slowest",
                f"export {var}={cores} (or let `cpuboost run` set it)")
        elif n < cores:
            add("info", f"{var}={n} uses {n} of {cores} physical cores", f"export {var}={cores} "
                "unless other work shares the machine")
    if "KMP_AFFINITY" in env and not any("iomp" in p for p in env.get("LD_PRELOAD", "").split(":")):
        add("info", "KMP_AFFINITY is set but Intel OpenMP is not preloaded: torch's GNU OpenMP "
            "ignores it", "unset KMP_AFFINITY, or `cpuboost run --omp-runtime intel`")
    if t.threads > logical:
        add("warning", f"torch uses {t.threads} threads but only {logical} CPUs are usable",
            "torch.set_num_threads(<physical cores>)")
    if len(topo.nodes) > 1 and not machine.numactl:
        add("warning", f"{len(topo.nodes)} NUMA nodes but numactl is not installed: "
            "`cpuboost run` can bind cores but not memory", "apt-get install numactl")
    if not machine.allocators:
        add("info", "neither jemalloc nor tcmalloc is installed; both cut allocation time of "
            "inference servers (`cpuboost run` sets glibc's malloc to keep freed memory "
            "meanwhile)", "apt-get install libjemalloc2 (then `cpuboost run` preloads it)")
    if f.arch.lower() in ("x86_64", "amd64") and "avx2" not in f.flags:
        add("warning", "no AVX2: every kernel falls back to slow generic code", "use a newer CPU")
    return out


def collect(features: CpuFeatures | None = None, topology: Topology | None = None,
            torch: TorchInfo | None = None, machine: Machine | None = None,
            environ: Mapping[str, str] | None = None, memory_mb: int | None = None) -> Report:
    from cpuboost.launch.execute import find_machine
    f = features or detect()
    topo = topology or read_topology()
    t = torch or torch_info()
    m = machine or find_machine()
    env = dict(os.environ if environ is None else environ)
    if memory_mb is None:
        import psutil
        memory_mb = psutil.virtual_memory().total // 2**20
    cores = topo.cores()
    nodes = [{"node": n, "cpus": format_cpulist(c.id for c in topo.cpus if c.node == n),
              "memory_mb": topo.node_memory_mb.get(n)} for n in topo.nodes]
    arm = f.arch.lower() in ("aarch64", "arm64")
    cpu = {"model": f.model_name, "arch": f.arch,
           "isa": {k: k in f.flags for k in (ISA_ORDER[9:] if arm else ISA_ORDER[:9])}}
    topology_d = {"sockets": len(topo.sockets), "physical_cores": len({c.core for c in topo.cpus}),
                  "threads_per_core": topo.threads_per_core, "logical_cpus": len(topo.cpus),
                  "usable_cpus": format_cpulist(c.id for c in topo.usable),
                  "usable_physical_cores": len(cores),
                  "offline_cpus": format_cpulist(topo.offline), "numa_nodes": nodes,
                  "memory_mb": memory_mb}
    torch_d = {"version": t.version, "build": f"CUDA {t.cuda}" if t.cuda else "CPU",
               "cpu_capability": t.capability, "onednn": t.onednn_version if t.mkldnn else None,
               "mkl": t.mkl, "parallel_backend": t.parallel_backend, "threads": t.threads,
               "cxx_compiler": t.compiler}
    tools = {"jemalloc": m.allocators.get("jemalloc"), "tcmalloc": m.allocators.get("tcmalloc"),
             "intel_openmp": m.iomp, "numactl": m.numactl, "taskset": m.taskset}
    watched = THREAD_VARS + ("KMP_AFFINITY", "KMP_BLOCKTIME", "OMP_PROC_BIND", "OMP_PLACES",
                              "LD_PRELOAD", "MALLOC_CONF")
    environment = {k: env[k] for k in watched if k in env}
    return Report(cpu, topology_d, torch_d, tools, environment,
                  _feature_table(f, t, len(cores)), _problems(f, topo, t, env, m))


def format_report(r: Report) -> str:
    yes = [k for k, v in r.cpu["isa"].items() if v]
    no = [k for k, v in r.cpu["isa"].items() if not v]
    t, tp = r.torch, r.topology
    lines = [
        f"CPU        {r.cpu['model'] or '?'} ({r.cpu['arch']})",
        f"  has      {', '.join(yes) or 'none of the tracked features'}",
        f"  lacks    {', '.join(no) or '-'}",
        f"Topology   {tp['sockets']} socket(s), {tp['physical_cores']} physical core(s), "
        f"{tp['threads_per_core']} thread(s) per core, {tp['logical_cpus']} logical CPU(s)",
        f"  usable   cpus {tp['usable_cpus']} ({tp['usable_physical_cores']} physical cores)"
        + (f"; offline {tp['offline_cpus']}" if tp["offline_cpus"] else ""),
    ]
    for n in tp["numa_nodes"]:
        mem = f", {n['memory_mb']} MB" if n["memory_mb"] is not None else ""
        lines.append(f"  node {n['node']}   cpus {n['cpus']}{mem}")
    lines += [
        f"Memory     {tp['memory_mb']} MB",
        f"torch      {t['version']} ({t['build']} build), kernels {t['cpu_capability']}, "
        f"oneDNN {t['onednn'] or 'absent'}, MKL {'yes' if t['mkl'] else 'no'}, "
        f"{t['parallel_backend']} with {t['threads']} threads",
        f"  C++      {t['cxx_compiler'] or 'not found'}",
        "Tools      " + ", ".join(f"{k} {'found' if v else 'not found'}"
                                  for k, v in r.tools.items()),
        "Env        " + (", ".join(f"{k}={v}" for k, v in r.environment.items()) or
                         "no thread/allocator variables set"),
        "",
        "cpuboost features here:",
    ]
    width = max(len(f["feature"]) for f in r.features)
    for f in r.features:
        lines.append(f"  {f['feature']:<{width}}  {f['level']:<16}  {f['why']}")
    lines.append("")
    if not r.problems:
        lines.append("No problems found.")
    for p in r.problems:
        lines.append(f"{p['level'].upper()}: {p['message']}")
        lines.append(f"  fix: {p['fix']}")
    return "\n".join(lines)
