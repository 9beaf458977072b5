"""`cpuboost run` end to end: real instances bound to this machine's cores, per-instance logs,
exit codes, errors before anything starts, and the torchrun hand-off with 2 ranks on loopback."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from cpuboost.hw.topology import read_topology
from cpuboost.launch.execute import exit_code, find_machine
from tests.runtime.test_memory import REQUESTS, RUNS, stock_faults

CORES = len(read_topology().cores())
needs_two = pytest.mark.skipif(CORES < 2, reason="needs 2 usable cores")

REPORT = textwrap.dedent("""
    import json, os, sys
    print("REPORT " + json.dumps({
        "instance": os.environ["CPUBOOST_INSTANCE"], "omp": os.environ["OMP_NUM_THREADS"],
        "cpus": sorted(os.sched_getaffinity(0)), "args": sys.argv[1:],
        "mkl": os.environ.get("MKL_NUM_THREADS"),
        "preload": os.environ.get("LD_PRELOAD", "")}))
    sys.exit(int(os.environ.get("FAIL_ON_" + os.environ["CPUBOOST_INSTANCE"], "0")))
""")


def cpuboost(*args, env=None, timeout=300):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "cpuboost.cli.main", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def reports(text):
    return [json.loads(line.split("REPORT ", 1)[1]) for line in text.splitlines()
            if "REPORT " in line]


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "report.py"
    path.write_text(REPORT)
    return path


@needs_two
def test_two_instances_bound_to_their_own_cores_with_logs(script, tmp_path):
    logs = tmp_path / "logs"
    r = cpuboost("run", "--ninstances", "2", "--log-dir", str(logs), "--memory-allocator",
                 "default", str(script), "a", "--flag", env={"MKL_NUM_THREADS": "8"})
    assert r.returncode == 0, r.stderr
    got = sorted(reports(r.stdout), key=lambda d: d["instance"])
    topo_cores = [core[0].id for core in read_topology().cores()]
    half = CORES // 2
    assert [d["cpus"] for d in got] == [topo_cores[:half], topo_cores[half:2 * half]]
    assert all(d["omp"] == str(len(d["cpus"])) for d in got)
    assert all(d["args"] == ["a", "--flag"] for d in got)
    assert all(d["mkl"] is None for d in got)  # the conflicting variable was removed
    assert not set(got[0]["cpus"]) & set(got[1]["cpus"])
    # terminal lines carry the instance prefix; each log file holds only its instance's output
    assert any(line.startswith("[1] REPORT") for line in r.stdout.splitlines())
    files = sorted(p.name for p in logs.iterdir())
    assert len(files) == 2 and files[0].startswith("run_instance_0_cpus_")
    for i, name in enumerate(files):
        assert [d["instance"] for d in reports((logs / name).read_text())] == [str(i)]


@needs_two
def test_a_failing_instance_fails_the_run(script, tmp_path):
    r = cpuboost("run", "--ninstances", "2", "--log-dir", str(tmp_path), str(script),
                 env={"FAIL_ON_1": "3"})
    assert r.returncode == 3
    assert "instance 1" in r.stderr and "exited with 3" in r.stderr
    assert len(reports(r.stdout)) == 2  # instance 0 ran to the end


def test_impossible_request_starts_nothing(tmp_path):
    marker = tmp_path / "started"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    r = cpuboost("run", "--ninstances", str(CORES + 1), str(script))
    assert r.returncode == 2
    assert f"--ninstances {CORES + 1} is more than the {CORES} usable" in r.stderr
    assert not marker.exists()
    r = cpuboost("run", "--nodes-list", "7", str(script))
    assert r.returncode == 2 and "node(s) [7]" in r.stderr
    r = cpuboost("run")
    assert r.returncode == 2 and "no program given" in r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.slow
def test_glibc_tuning_stops_the_page_faults_of_repeated_requests(tmp_path):
    path = tmp_path / "requests.py"
    path.write_text(REQUESTS)  # run as "stock": the settings come from cpuboost run's env

    def faults(allocator: str) -> float:
        r = cpuboost("run", "--memory-allocator", allocator, str(path), "stock")
        assert r.returncode == 0, r.stderr
        return float(r.stdout.split()[-1])

    stock_faults(lambda: faults("default"))
    tuned = [faults("glibc") for _ in range(RUNS)]
    assert all(f < 16 for f in tuned), tuned


def test_explicit_missing_allocator_is_refused_or_preloaded(script):
    found = find_machine().allocators
    r = cpuboost("run", "--memory-allocator", "jemalloc", str(script))
    if "jemalloc" in found:
        assert r.returncode == 0 and "jemalloc" in reports(r.stdout)[0]["preload"]
    else:
        assert r.returncode == 2 and "libjemalloc2" in r.stderr


def test_module_mode_and_dry_run(tmp_path):
    pkg = tmp_path / "mypkg_cb"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(REPORT)
    r = cpuboost("run", "-m", "mypkg_cb.main", "x", env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert reports(r.stdout)[0]["args"] == ["x"]
    r = cpuboost("run", "--dry-run", "--json", "-m", "mypkg_cb.main")
    plan = json.loads(r.stdout)
    assert plan["instances"][0]["env"]["OMP_NUM_THREADS"] == str(CORES)
    r = cpuboost("run", "--dry-run", "--ninstances", "1", "prog.py", "a")
    assert "command[0]:" in r.stdout and "prog.py a" in r.stdout


def test_no_python_runs_an_executable():
    r = cpuboost("run", "--no-python", "sh", "-c", "echo threads=$OMP_NUM_THREADS")
    assert r.returncode == 0 and f"threads={CORES}" in r.stdout


def test_exit_code_of_a_signalled_child():
    assert exit_code(-9) == 137 and exit_code(0) == 0 and exit_code(4) == 4


DISTRIBUTED = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).eval()
    batch = torch.randn(11, 8)
    with torch.no_grad():
        shards = [None] * world
        dist.all_gather_object(shards, model(batch[rank::world]))
        if rank == 0:
            out = torch.empty(11, 4)
            for r, s in enumerate(shards):
                out[r::world] = s
            print("GATHERED " + json.dumps({
                "sum": total.item(), "world": world,
                "max_err": (out - model(batch)).abs().max().item()}))
    print("RANK " + json.dumps({"rank": rank, "cpus": sorted(os.sched_getaffinity(0)),
                                "threads": torch.get_num_threads()}))
    dist.destroy_process_group()
""")


@needs_two
def test_two_ranks_on_loopback_all_reduce_and_sharded_inference(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DISTRIBUTED)
    logs = tmp_path / "logs"
    r = cpuboost("run", "--nproc-per-node", "2", "--log-dir", str(logs), str(script))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(logs.rglob("stdout.log"))) == 2  # torchrun's per-rank files
    line = next(l for l in r.stdout.splitlines() if "GATHERED " in l)
    got = json.loads(line.split("GATHERED ", 1)[1])
    assert got["sum"] == 3.0 and got["world"] == 2
    assert got["max_err"] <= 1e-6  # the same rows through the same model: tolerance for ulps
    ranks = [json.loads(l.split("RANK ", 1)[1]) for l in r.stdout.splitlines() if "RANK " in l]
    assert len(ranks) == 2
    assert not set(ranks[0]["cpus"]) & set(ranks[1]["cpus"])  # each rank on its own cores
    assert all(d["threads"] == len(d["cpus"]) for d in ranks)


def test_distributed_options_are_checked():
    r = cpuboost("run", "--nnodes", "2", "x.py")
    assert r.returncode == 2 and "--master-addr" in r.stderr
    r = cpuboost("run", "--nproc-per-node", "1", "--instance-idx", "0", "x.py")
    assert r.returncode == 2 and "instance-idx" in r.stderr
    r = cpuboost("run", "--dry-run", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                 "10.0.0.1", "--nproc-per-node", "1", "x.py")
    assert r.returncode == 0
    assert "torch.distributed.run --nnodes=2 --nproc-per-node=1 --node-rank=1 " \
           "--master-addr=10.0.0.1 --master-port=29500" in r.stdout


@needs_two
def test_without_numactl_or_taskset_the_entry_binds_itself(script):
    import io
    from cpuboost.launch.execute import execute
    from cpuboost.launch.plan import LaunchOptions, Machine, plan
    the_plan = plan(read_topology(), LaunchOptions(ninstances=2, memory_allocator="default"),
                    Machine(), {})
    assert the_plan.binder == "sched_setaffinity"
    from cpuboost.launch.execute import BIND_ENTRY, instance_command
    assert instance_command(the_plan, the_plan.instances[0], Machine(), ["prog"])[:3] == [
        sys.executable, str(BIND_ENTRY), "--cpus"]
    out = io.StringIO()
    assert execute(the_plan, Machine(), [sys.executable, str(script)], out=out) == 0
    got = sorted(reports(out.getvalue()), key=lambda d: d["instance"])
    assert [d["cpus"] for d in got] == [list(i.cpus) for i in the_plan.instances]
