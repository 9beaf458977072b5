"""`cpuboost doctor`: right about this machine (checked against lscpu), and flags broken set-ups
given to it as fakes."""
import json
from dataclasses import replace
import shutil
import subprocess
import sys

import pytest

from cpuboost.doctor import FAST, SLOW, UNAVAILABLE, TorchInfo, collect, format_report
from cpuboost.hw.features import CpuFeatures
from cpuboost.hw.topology import Topology
from cpuboost.launch.plan import Machine

CPU_BUILD = TorchInfo("2.13.0+cpu", None, False, "AVX512", True, "3.12.0", True, "OpenMP", 4,
                      "/usr/bin/g++")


def features(*flags, arch="x86_64"):
    return CpuFeatures(arch, "Test CPU", frozenset(flags), 4, 4, True, True)


def fake(flags=("avx2", "avx512", "avx512_vnni", "avx512_bf16"), torch=CPU_BUILD, env=None,
         machine=Machine(taskset="/usr/bin/taskset"), topology=None, arch="x86_64"):
    return collect(features(*flags, arch=arch),
                   topology or Topology.synthetic(cores_per_socket=4), torch, machine,
                   env or {}, memory_mb=16384)


def _lscpu() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in out.splitlines())}


@pytest.mark.skipif(not shutil.which("lscpu"), reason="lscpu not installed")
def test_this_machine_agrees_with_lscpu():
    ls = _lscpu()
    r = collect()
    t = r.topology
    assert t["sockets"] == int(ls["Socket(s)"])
    assert t["threads_per_core"] == int(ls["Thread(s) per core"])
    assert t["physical_cores"] == int(ls["Core(s) per socket"]) * int(ls["Socket(s)"])
    assert t["logical_cpus"] == int(ls["CPU(s)"])
    assert len(t["numa_nodes"]) == int(ls.get("NUMA node(s)", "1"))
    assert r.cpu["model"] == ls["Model name"]
    flags = set(ls.get("Flags", "").split())
    for ours, theirs in [("avx2", "avx2"), ("avx512", "avx512f"), ("avx512_vnni", "avx512_vnni"),
                         ("avx512_bf16", "avx512_bf16"), ("amx_bf16", "amx_bf16")]:
        if ours in r.cpu["isa"]:
            assert r.cpu["isa"][ours] == (theirs in flags), ours
    assert "No problems found." in format_report(r) or "fix:" in format_report(r)


def test_cli_text_and_json():
    out = subprocess.run([sys.executable, "-m", "cpuboost.cli.main", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1)
    d = json.loads(out.stdout)
    assert {"cpu", "topology", "torch", "tools", "features", "problems", "ok"} <= set(d)
    text = subprocess.run([sys.executable, "-m", "cpuboost.cli.main", "doctor"],
                          capture_output=True, text=True, timeout=120).stdout
    assert "cpuboost features here:" in text and "Topology" in text


def test_cuda_build_without_gpu_is_an_error_with_the_exact_fix():
    cuda = TorchInfo("2.13.0+cu128", "12.8", False, "AVX512", True, "3.12.0", True, "OpenMP", 4,
                     "/usr/bin/g++")
    r = fake(torch=cuda)
    assert not r.ok
    (p,) = [p for p in r.problems if p["level"] == "error"]
    assert "CUDA 12.8 build" in p["message"]
    assert p["fix"] == ("pip install --force-reinstall 'torch==2.13.0' --index-url "
                        "https://download.pytorch.org/whl/cpu")
    assert fake(torch=replace(cuda, gpu_present=True)).ok  # a GPU machine may want CUDA


def test_thread_variables_that_oversubscribe_are_flagged():
    r = fake(env={"OMP_NUM_THREADS": "64", "MKL_NUM_THREADS": "2", "KMP_AFFINITY": "compact"})
    msgs = {p["message"].split(" ")[0]: p for p in r.problems}
    assert msgs["OMP_NUM_THREADS=64"]["level"] == "warning"
    assert "oversubscribe" in msgs["OMP_NUM_THREADS=64"]["message"]
    assert msgs["OMP_NUM_THREADS=64"]["fix"].startswith("export OMP_NUM_THREADS=4")
    assert msgs["MKL_NUM_THREADS=2"]["level"] == "info"
    assert any("KMP_AFFINITY" in p["message"] for p in r.problems)
    assert r.environment["OMP_NUM_THREADS"] == "64"
    assert r.ok  # warnings do not fail the check


def test_feature_table_follows_the_isa():
    def levels(r):
        return {f["feature"].split(" ")[0]: f["level"] for f in r.features}
    zen4 = levels(fake())
    assert zen4["bf16"] == FAST and zen4["int8"] == FAST and zen4["fp16"] == SLOW
    avx2 = levels(fake(flags=("avx2",)))
    assert avx2["bf16"] == SLOW and avx2["int8"] == SLOW and avx2["optimize"] == FAST
    # with FMA and a compiler, bf16 is bf16 weights in cpuboost's AVX2 kernel, fp32 arithmetic
    fma = fake(flags=("avx2", "fma"))
    assert levels(fma)["bf16"] == FAST
    assert any("bf16 weights" in f["why"] for f in fma.features if f["feature"].startswith("bf16"))
    assert any("3x3 convs (Winograd)" in f["why"] for f in fma.features
               if f["feature"].startswith("optimize fp32"))
    # int8 without VNNI: cpuboost's AVX2 int8 kernel where it can be built
    assert levels(fma)["int8"] == FAST
    assert any("AVX2 int8 kernel" in f["why"] for f in fma.features
               if f["feature"].startswith("int8"))
    no_compiler = levels(fake(flags=("avx2", "fma"), torch=replace(CPU_BUILD, compiler=None)))
    assert no_compiler["bf16"] == SLOW and no_compiler["int8"] == SLOW
    amx = fake(flags=("avx2", "avx512", "avx512_bf16", "amx_bf16", "amx_int8", "amx_fp16"))
    assert levels(amx)["fp16"] == FAST
    assert any("AMX" in f["why"] for f in amx.features)
    assert levels(fake(torch=replace(CPU_BUILD, compiler=None)))["graph"] == UNAVAILABLE
    arm = fake(flags=("neon", "arm_bf16", "i8mm"), arch="aarch64")
    assert set(arm.cpu["isa"]) == {"neon", "sve", "sve2", "arm_bf16", "i8mm", "arm_fp16"}
    assert levels(arm)["bf16"] == FAST and levels(arm)["int8"] == FAST


def test_multi_node_without_numactl_and_no_allocator():
    r = fake(topology=Topology.synthetic(sockets=2, cores_per_socket=2))
    assert any("apt-get install numactl" == p["fix"] for p in r.problems)
    assert any("libjemalloc2" in p["fix"] for p in r.problems)
    assert len(r.topology["numa_nodes"]) == 2
