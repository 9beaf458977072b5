"""Topology: sysfs reading (against a fake sysfs tree) and the synthetic builder the plan tests
use."""
import pytest

from cpuboost.hw.topology import Topology, _cpulist, format_cpulist, read_topology


@pytest.mark.parametrize("text,ids", [("0", [0]), ("0-3", [0, 1, 2, 3]),
                                      ("0-1,4,6-7\n", [0, 1, 4, 6, 7]), ("", [])])
def test_cpulist_round_trip(text, ids):
    assert _cpulist(text) == ids
    assert _cpulist(format_cpulist(ids)) == ids


def _fake_sysfs(root, cpus, online, nodes, mem_kb=None):
    """cpus: {id: (socket, core_id)}; nodes: {node: [ids]}."""
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "online").write_text(online + "\n")
    (root / "cpu" / "present").write_text(format_cpulist(cpus) + "\n")
    for cpu, (socket, core) in cpus.items():
        d = root / "cpu" / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{socket}\n")
        (d / "core_id").write_text(f"{core}\n")
    for node, ids in nodes.items():
        d = root / "node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(format_cpulist(ids) + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal:       {mem_kb or 4194304} kB\n")


def test_read_two_sockets_smt_with_an_offline_cpu(tmp_path):
    # 2 sockets x 2 cores x 2 threads; core ids restart per socket (as the kernel reports them)
    cpus = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    _fake_sysfs(tmp_path, cpus, "0-6", {0: [0, 1, 4, 5], 1: [2, 3, 6]})
    topo = read_topology(tmp_path, allowed=frozenset(range(8)))
    assert [c.id for c in topo.cpus] == [0, 1, 2, 3, 4, 5, 6]
    assert topo.offline == (7,)
    assert topo.nodes == (0, 1) and topo.sockets == (0, 1)
    assert topo.threads_per_core == 2
    assert topo.node_memory_mb == {0: 4096, 1: 4096}
    # physical cores: siblings grouped, primary first; socket 1's core 0 is not socket 0's core 0
    assert [[c.id for c in core] for core in topo.cores()] == [[0, 4], [1, 5], [2, 6], [3]]
    assert [[c.id for c in core] for core in topo.cores(1)] == [[2, 6], [3]]


def test_affinity_mask_limits_usable_cpus(tmp_path):
    _fake_sysfs(tmp_path, {i: (0, i) for i in range(4)}, "0-3", {0: [0, 1, 2, 3]})
    topo = read_topology(tmp_path, allowed=frozenset({1, 3}))
    assert [c.id for c in topo.usable] == [1, 3]
    assert len(topo.cpus) == 4


def test_no_sysfs_falls_back_to_one_core_per_cpu(tmp_path):
    topo = read_topology(tmp_path / "missing")
    assert topo.nodes == (0,) and len(topo.cpus) >= 1


def test_this_machine_matches_the_kernel():
    topo = read_topology()
    import os
    assert {c.id for c in topo.usable} == os.sched_getaffinity(0)


def test_synthetic_numbering_is_linux_style():
    topo = Topology.synthetic(sockets=2, cores_per_socket=2, threads_per_core=2)
    assert [(c.id, c.core, c.socket, c.node) for c in topo.cpus] == [
        (0, 0, 0, 0), (1, 1, 0, 0), (2, 2, 1, 1), (3, 3, 1, 1),
        (4, 0, 0, 0), (5, 1, 0, 0), (6, 2, 1, 1), (7, 3, 1, 1)]
    two_nodes = Topology.synthetic(cores_per_socket=4, nodes_per_socket=2)
    assert [c.node for c in two_nodes.cpus] == [0, 0, 1, 1]
