"""`cpuboost run`'s plan against made-up machines; every expectation worked out by hand."""
import pytest

from cpuboost.errors import ConfigError
from cpuboost.hw.topology import Topology
from cpuboost.launch.plan import GLIBC_TUNED, JEMALLOC_CONF, LaunchOptions as O, Machine, plan

NUMACTL = Machine(numactl="/usr/bin/numactl", taskset="/usr/bin/taskset")
# 2 sockets x 4 cores x 2 threads: cpus 0-3 socket/node 0, 4-7 node 1; siblings 8-11, 12-15
TWO_SOCKETS = Topology.synthetic(sockets=2, cores_per_socket=4, threads_per_core=2)


def cpus(p):
    return [list(i.cpus) for i in p.instances]


def test_one_socket_default_is_one_instance_on_every_core():
    p = plan(Topology.synthetic(cores_per_socket=4), O(), NUMACTL)
    assert cpus(p) == [[0, 1, 2, 3]]
    assert p.instances[0].memory_node == 0
    assert p.instance_env(p.instances[0])["OMP_NUM_THREADS"] == "4"


def test_two_sockets_default_uses_physical_cores_and_says_it_spans_nodes():
    p = plan(TWO_SOCKETS, O(), NUMACTL)
    assert cpus(p) == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert p.instances[0].memory_node is None
    assert any("spans nodes [0, 1]" in n for n in p.notes)


def test_two_instances_one_per_socket_with_memory_bound():
    p = plan(TWO_SOCKETS, O(ninstances=2), NUMACTL)
    assert cpus(p) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [i.memory_node for i in p.instances] == [0, 1]
    assert p.binding_command(p.instances[1], NUMACTL) == [
        "/usr/bin/numactl", "--physcpubind=4-7", "--membind=1"]


def test_logical_cores_keep_siblings_together():
    p = plan(TWO_SOCKETS, O(ninstances=2, use_logical_cores=True), NUMACTL)
    assert cpus(p) == [[0, 8, 1, 9, 2, 10, 3, 11], [4, 12, 5, 13, 6, 14, 7, 15]]
    assert p.instances[0].cpulist == "0-3,8-11"
    assert p.instance_env(p.instances[0])["OMP_NUM_THREADS"] == "8"


def test_throughput_mode_is_one_instance_per_node():
    p = plan(TWO_SOCKETS, O(throughput_mode=True), NUMACTL)
    assert cpus(p) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_latency_mode_is_four_cores_per_instance():
    p = plan(Topology.synthetic(sockets=2, cores_per_socket=6), O(latency_mode=True), NUMACTL)
    assert cpus(p) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    # instance 1 takes cores 4,5 of socket 0 and 6,7 of socket 1
    assert p.instances[1].nodes == (0, 1)
    small = plan(Topology.synthetic(cores_per_socket=2), O(latency_mode=True), NUMACTL)
    assert cpus(small) == [[0, 1]]


def test_cores_per_instance_crossing_a_node_unless_told_not_to():
    p = plan(TWO_SOCKETS, O(ncores_per_instance=3), NUMACTL)
    assert cpus(p) == [[0, 1, 2], [3, 4, 5]]
    assert p.instances[1].memory_node is None
    assert any("2 of 8 usable physical cores are left unused" in n for n in p.notes)
    p = plan(TWO_SOCKETS, O(ncores_per_instance=3, skip_cross_node_cores=True), NUMACTL)
    assert cpus(p) == [[0, 1, 2], [4, 5, 6]]
    assert [i.memory_node for i in p.instances] == [0, 1]
    # 3 instances x 2 cores fit in 2 x 3 cores only by straddling the nodes
    three_each = Topology.synthetic(sockets=2, cores_per_socket=3)
    assert cpus(plan(three_each, O(ninstances=3, ncores_per_instance=2))) == [
        [0, 1], [2, 3], [4, 5]]
    with pytest.raises(ConfigError, match=r"only 2 instance\(s\) of 2"):
        plan(three_each, O(ninstances=3, ncores_per_instance=2, skip_cross_node_cores=True))


def test_odd_core_count_leaves_the_remainder_unused():
    p = plan(Topology.synthetic(cores_per_socket=5), O(ninstances=2), NUMACTL)
    assert cpus(p) == [[0, 1], [2, 3]]
    assert any("1 of 5" in n for n in p.notes)


def test_offline_cores_are_skipped():
    topo = Topology.synthetic(cores_per_socket=4, offline=[2])
    p = plan(topo, O(ninstances=3), NUMACTL)
    assert cpus(p) == [[0], [1], [3]]
    assert any("cpus 2 are offline" in n for n in p.notes)
    with pytest.raises(ConfigError, match="more than the 3 usable"):
        plan(topo, O(ninstances=4))


def test_affinity_mask_limits_the_plan():
    p = plan(Topology.synthetic(cores_per_socket=4, allowed={2, 3}), O(), NUMACTL)
    assert cpus(p) == [[2, 3]]


def test_nodes_list_selects_nodes():
    p = plan(TWO_SOCKETS, O(nodes_list=(1,), ninstances=2), NUMACTL)
    assert cpus(p) == [[4, 5], [6, 7]]
    with pytest.raises(ConfigError, match=r"node\(s\) \[2\].*\[0, 1\]"):
        plan(TWO_SOCKETS, O(nodes_list=(2,)))


def test_instance_idx_picks_one_but_keeps_the_total():
    p = plan(TWO_SOCKETS, O(ninstances=4, instance_idx=2), NUMACTL)
    assert cpus(p) == [[4, 5]]
    assert p.instance_env(p.instances[0])["CPUBOOST_NINSTANCES"] == "4"
    with pytest.raises(ConfigError, match="outside"):
        plan(TWO_SOCKETS, O(ninstances=2, instance_idx=2))


@pytest.mark.parametrize("options,match", [
    (O(ninstances=3, ncores_per_instance=3), "need 9 physical cores but only 8"),
    (O(ncores_per_instance=9), "more than the 8"),
    (O(ninstances=-1), "must be positive"),
    (O(latency_mode=True, throughput_mode=True), "exclude each other"),
    (O(throughput_mode=True, ninstances=2), "throughput-mode decides"),
    (O(memory_allocator="mimalloc"), "not one of"),
    (O(omp_runtime="llvm"), "not one of"),
])
def test_impossible_requests_fail_before_anything_starts(options, match):
    with pytest.raises(ConfigError, match=match):
        plan(TWO_SOCKETS, options, NUMACTL)


def test_allocator_auto_prefers_jemalloc_and_keeps_the_users_preload():
    m = Machine(allocators={"jemalloc": "/lib/libjemalloc.so.2", "tcmalloc": "/lib/libtc.so"})
    p = plan(TWO_SOCKETS, O(), m, {"LD_PRELOAD": "/opt/mine.so"})
    assert p.allocator == "jemalloc"
    assert p.env["LD_PRELOAD"] == "/lib/libjemalloc.so.2:/opt/mine.so"
    assert p.env["MALLOC_CONF"] == JEMALLOC_CONF
    p = plan(TWO_SOCKETS, O(), Machine(allocators={"tcmalloc": "/lib/libtc.so"}))
    assert (p.allocator, p.env["LD_PRELOAD"]) == ("tcmalloc", "/lib/libtc.so")
    assert "MALLOC_CONF" not in p.env
    p = plan(TWO_SOCKETS, O(), Machine())
    assert p.allocator == "glibc" and "LD_PRELOAD" not in p.env
    assert {k: p.env[k] for k in GLIBC_TUNED} == GLIBC_TUNED
    assert any("apt-get install libjemalloc2" in n for n in p.notes)
    p = plan(TWO_SOCKETS, O(memory_allocator="default"), m)
    assert "LD_PRELOAD" not in p.env
    assert not set(GLIBC_TUNED) & set(p.env)


def test_glibc_tuning_is_explicit_or_auto_and_yields_to_the_users_settings():
    jem = Machine(allocators={"jemalloc": "/lib/libjemalloc.so.2"})
    p = plan(TWO_SOCKETS, O(memory_allocator="glibc"), jem)  # asked for, though jemalloc exists
    assert p.allocator == "glibc" and "LD_PRELOAD" not in p.env and "MALLOC_CONF" not in p.env
    assert {k: p.env[k] for k in GLIBC_TUNED} == GLIBC_TUNED
    mine = {"MALLOC_TRIM_THRESHOLD_": "0"}
    p = plan(TWO_SOCKETS, O(), Machine(), mine)
    assert p.allocator == "glibc" and not set(GLIBC_TUNED) & set(p.env)
    assert any("MALLOC_TRIM_THRESHOLD_ already set" in n for n in p.notes)
    assert int(GLIBC_TUNED["MALLOC_MMAP_THRESHOLD_"]) <= 32 << 20  # glibc ignores more


def test_missing_allocator_asked_for_explicitly_is_an_error_with_the_fix():
    with pytest.raises(ConfigError, match="libtcmalloc-minimal4"):
        plan(TWO_SOCKETS, O(memory_allocator="tcmalloc"), Machine())


def test_intel_openmp():
    m = Machine(iomp="/opt/lib/libiomp5.so")
    p = plan(TWO_SOCKETS, O(omp_runtime="intel", memory_allocator="default"), m)
    assert p.env["LD_PRELOAD"] == "/opt/lib/libiomp5.so"
    assert p.env["KMP_AFFINITY"] == "granularity=fine,compact,1,0"
    assert plan(TWO_SOCKETS, O(omp_runtime="auto"), m).omp_runtime == "intel"
    assert plan(TWO_SOCKETS, O(omp_runtime="auto"), Machine()).omp_runtime == "default"
    with pytest.raises(ConfigError, match="intel-openmp"):
        plan(TWO_SOCKETS, O(omp_runtime="intel"), Machine())


def test_conflicting_thread_variables_are_replaced_and_reported():
    p = plan(TWO_SOCKETS, O(ninstances=2), NUMACTL,
             {"OMP_NUM_THREADS": "64", "MKL_NUM_THREADS": "64"})
    assert p.unset == ("MKL_NUM_THREADS",)
    assert [p.instance_env(i)["OMP_NUM_THREADS"] for i in p.instances] == ["4", "4"]
    assert any("OMP_NUM_THREADS=64 was set" in n for n in p.notes)


def test_binder_falls_back_to_taskset_then_sched_setaffinity():
    p = plan(TWO_SOCKETS, O(ninstances=2), Machine(taskset="/usr/bin/taskset"))
    assert p.binder == "taskset"
    assert p.binding_command(p.instances[1], Machine(taskset="/usr/bin/taskset")) == [
        "/usr/bin/taskset", "-c", "4-7"]
    assert any("numactl not found" in n for n in p.notes)
    p = plan(TWO_SOCKETS, O(ninstances=2), Machine())
    assert p.binder == "sched_setaffinity" and p.binding_command(p.instances[0], Machine()) == []


def test_plan_serialises():
    import json
    d = json.loads(plan(TWO_SOCKETS, O(ninstances=2), NUMACTL).to_json())
    assert d["instances"][1]["cpulist"] == "4-7"
    assert d["instances"][1]["env"]["CPUBOOST_INSTANCE"] == "1"
