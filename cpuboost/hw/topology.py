"""CPU topology: which logical CPUs exist, which physical core and socket each belongs to, which
NUMA node holds it, and which of them this process may use. Read from Linux sysfs; built by hand
for tests (``Topology.synthetic``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Cpu:
    id: int       # logical CPU number, as taskset/numactl/sched_setaffinity take it
    core: int     # physical core, numbered across sockets (siblings share it)
    socket: int
    node: int     # NUMA node


@dataclass(frozen=True)
class Topology:
    cpus: tuple[Cpu, ...]                     # online CPUs, by id
    offline: tuple[int, ...] = ()
    allowed: frozenset[int] | None = None     # this process's affinity mask (None: all)
    node_memory_mb: dict = field(default_factory=dict)  # node -> MB of memory

    # -- views ------------------------------------------------------------------------------------
    @property
    def usable(self) -> tuple[Cpu, ...]:
        """Online CPUs this process may run on."""
        if self.allowed is None:
            return self.cpus
        return tuple(c for c in self.cpus if c.id in self.allowed)

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cpus}))

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cpus}))

    def cores(self, node: int | None = None) -> list[tuple[Cpu, ...]]:
        """Usable physical cores in order, each as its usable logical CPUs (first = primary)."""
        by_core: dict[int, list[Cpu]] = {}
        for c in self.usable:
            if node is None or c.node == node:
                by_core.setdefault(c.core, []).append(c)
        return [tuple(sorted(v, key=lambda c: c.id))
                for _, v in sorted(by_core.items(), key=lambda kv: min(c.id for c in kv[1]))]

    @property
    def threads_per_core(self) -> int:
        counts: dict[int, int] = {}
        for c in self.cpus:
            counts[c.core] = counts.get(c.core, 0) + 1
        return max(counts.values(), default=1)

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def synthetic(sockets: int = 1, cores_per_socket: int = 2, threads_per_core: int = 1,
                  nodes_per_socket: int = 1, offline=(), allowed=None) -> "Topology":
        """Linux's usual numbering: first threads of every core (socket by socket), then the second
        threads in the same order. Nodes split each socket's cores evenly."""
        cores = sockets * cores_per_socket
        per_node = cores_per_socket // nodes_per_socket
        cpus = []
        for t in range(threads_per_core):
            for s in range(sockets):
                for k in range(cores_per_socket):
                    core = s * cores_per_socket + k
                    node = s * nodes_per_socket + min(k // max(per_node, 1), nodes_per_socket - 1)
                    cpus.append(Cpu(t * cores + core, core, s, node))
        offline = tuple(sorted(offline))
        return Topology(tuple(c for c in cpus if c.id not in offline), offline,
                        None if allowed is None else frozenset(allowed))


def _cpulist(text: str) -> list[int]:
    """Parse a kernel CPU list: "0-3,8,10-11"."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def format_cpulist(ids) -> str:
    """The inverse of the kernel's format: [0, 1, 2, 5] -> "0-2,5"."""
    ids = sorted(set(ids))
    runs, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            runs.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(runs)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_topology(sysfs: str | os.PathLike = "/sys/devices/system",
                  allowed: frozenset[int] | None = None) -> Topology:
    """The machine's topology from sysfs. Without sysfs (not Linux, a locked-down container) every
    CPU is its own core on socket 0, node 0."""
    root = Path(sysfs)
    if allowed is None and hasattr(os, "sched_getaffinity") and str(root) == "/sys/devices/system":
        allowed = frozenset(os.sched_getaffinity(0))
    online_text = _read(root / "cpu" / "online")
    if online_text is None:
        n = os.cpu_count() or 1
        return Topology(tuple(Cpu(i, i, 0, 0) for i in range(n)), (), allowed)
    online = _cpulist(online_text)
    present = _cpulist(_read(root / "cpu" / "present") or online_text)
    node_of: dict[int, int] = {}
    memory: dict[int, int] = {}
    node_dir = root / "node"
    if node_dir.is_dir():
        for d in sorted(node_dir.glob("node[0-9]*")):
            n = int(d.name[4:])
            for cpu in _cpulist(_read(d / "cpulist") or ""):
                node_of[cpu] = n
            for line in (_read(d / "meminfo") or "").splitlines():
                if "MemTotal:" in line:
                    memory[n] = int(line.split()[-2]) // 1024
    cores: dict[tuple[int, int], int] = {}
    cpus = []
    for cpu in online:
        topo = root / "cpu" / f"cpu{cpu}" / "topology"
        socket = int((_read(topo / "physical_package_id") or "0").strip() or 0)
        core_id = int((_read(topo / "core_id") or str(cpu)).strip() or cpu)
        core = cores.setdefault((socket, core_id), len(cores))
        cpus.append(Cpu(cpu, core, max(socket, 0), node_of.get(cpu, 0)))
    offline = tuple(c for c in present if c not in set(online))
    return Topology(tuple(cpus), offline, allowed, memory)
