"""What `cpuboost run` will do, as a pure function of (topology, options, machine, environment):
how many instances, the CPUs and memory node of each, its thread count, and the environment
(OpenMP, allocator preload) every instance starts with. Nothing here reads the machine or starts
anything, so every rule is testable against made-up topologies."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

from cpuboost._memory import GLIBC_TUNED
from cpuboost.errors import ConfigError
from cpuboost.hw.topology import Topology, format_cpulist

ALLOCATORS = ("auto", "default", "jemalloc", "tcmalloc", "glibc")
OMP_RUNTIMES = ("auto", "default", "intel")
LATENCY_CORES = 4  # cores per instance in --latency-mode (IPEX's choice)

# Settings tuned for inference servers: never return memory to the OS (no page-fault storms
# when the next request allocates the same activations again).
JEMALLOC_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                 "dirty_decay_ms:-1,muzzy_decay_ms:-1")
INSTALL_HINT = {
    "jemalloc": "install it with `apt-get install libjemalloc2` (Debian/Ubuntu), "
                "`dnf install jemalloc` (Fedora/RHEL) or `conda install jemalloc`",
    "tcmalloc": "install it with `apt-get install libtcmalloc-minimal4` (Debian/Ubuntu), "
                "`dnf install gperftools-libs` (Fedora/RHEL) or `conda install gperftools`",
    "intel": "install it with `pip install intel-openmp` or `conda install intel-openmp`",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class LaunchOptions:
    """`cpuboost run`'s choices, in IPEX launcher names. 0 / None means "decide for me"."""
    ninstances: int = 0
    ncores_per_instance: int = 0
    nodes_list: tuple[int, ...] | None = None
    use_logical_cores: bool = False
    skip_cross_node_cores: bool = False
    latency_mode: bool = False
    throughput_mode: bool = False
    memory_allocator: str = "auto"
    omp_runtime: str = "default"
    instance_idx: int | None = None
    bind_memory: bool = True


@dataclass(frozen=True)
class Machine:
    """What is installed: libraries found on disk and the binding tools on PATH."""
    allocators: Mapping[str, str] = field(default_factory=dict)  # name -> library path
    iomp: str | None = None
    numactl: str | None = None
    taskset: str | None = None


@dataclass(frozen=True)
class Instance:
    index: int
    cpus: tuple[int, ...]
    nodes: tuple[int, ...]
    memory_node: int | None  # bind memory here (all its CPUs are on this node)

    @property
    def threads(self) -> int:
        return len(self.cpus)

    @property
    def cpulist(self) -> str:
        return format_cpulist(self.cpus)


@dataclass(frozen=True)
class Plan:
    instances: tuple[Instance, ...]
    env: Mapping[str, str]        # set for every instance (allocator, OpenMP runtime)
    unset: tuple[str, ...]        # removed from every instance's environment
    allocator: str
    omp_runtime: str
    binder: str                   # numactl, taskset or sched_setaffinity
    notes: tuple[str, ...]
    total_instances: int          # before --instance-idx picked one

    def instance_env(self, inst: Instance) -> dict[str, str]:
        env = dict(self.env)
        env.update(OMP_NUM_THREADS=str(inst.threads), CPUBOOST_INSTANCE=str(inst.index),
                   CPUBOOST_NINSTANCES=str(self.total_instances), CPUBOOST_CPUS=inst.cpulist)
        return env

    def binding_command(self, inst: Instance, machine: Machine) -> list[str]:
        """The prefix that binds a process to the instance's CPUs (and memory node)."""
        if self.binder == "numactl":
            cmd = [machine.numactl, f"--physcpubind={inst.cpulist}"]
            if inst.memory_node is not None:
                cmd.append(f"--membind={inst.memory_node}")
            return cmd
        if self.binder == "taskset":
            return [machine.taskset, "-c", inst.cpulist]
        return []

    def to_dict(self) -> dict:
        return {"instances": [dict(asdict(i), threads=i.threads, cpulist=i.cpulist,
                                   env=self.instance_env(i)) for i in self.instances],
                "env": dict(self.env), "unset": list(self.unset), "allocator": self.allocator,
                "omp_runtime": self.omp_runtime, "binder": self.binder,
                "notes": list(self.notes), "total_instances": self.total_instances}

    def describe(self) -> str:
        lines = [f"{len(self.instances)} instance(s) of {self.total_instances}; "
                 f"allocator: {self.allocator}; OpenMP: {self.omp_runtime}; "
                 f"binding: {self.binder}"]
        for i in self.instances:
            mem = (f", memory on node {i.memory_node}"
                   if i.memory_node is not None and self.binder == "numactl" else "")
            lines.append(f"  instance {i.index}: cpus {i.cpulist} ({i.threads} thread(s), "
                         f"node {format_cpulist(i.nodes)}{mem})")
        for k, v in sorted(self.env.items()):
            lines.append(f"  {k}={v}")
        for k in self.unset:
            lines.append(f"  unset {k}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _units(topology: Topology, nodes, logical: bool) -> dict[int, list[int]]:
    """Per node, the CPU ids an instance can take one by one: the first thread of each
    physical core, or every logical CPU (core by core, so siblings stay together)."""
    out = {}
    for n in nodes:
        cores = topology.cores(n)
        out[n] = [c.id for core in cores for c in (core if logical else core[:1])]
    return out


def _check_options(o: LaunchOptions) -> None:
    if o.memory_allocator not in ALLOCATORS:
        raise ConfigError(f"--memory-allocator {o.memory_allocator!r} is not one of "
                          f"{', '.join(ALLOCATORS)}")
    if o.omp_runtime not in OMP_RUNTIMES:
        raise ConfigError(f"--omp-runtime {o.omp_runtime!r} is not one of "
                          f"{', '.join(OMP_RUNTIMES)}")
    if o.ninstances < 0 or o.ncores_per_instance < 0:
        raise ConfigError(f"--ninstances ({o.ninstances}) and --ncores-per-instance "
                          f"({o.ncores_per_instance}) must be positive (0 = decide for me)")
    if o.latency_mode and o.throughput_mode:
        raise ConfigError("--latency-mode and --throughput-mode exclude each other; pick one")
    if o.throughput_mode and (o.ninstances or o.ncores_per_instance):
        raise ConfigError("--throughput-mode decides the instances itself (one per NUMA node, all "
                          "its cores); drop it or drop --ninstances/--ncores-per-instance")
    if o.latency_mode and o.ninstances:
        raise ConfigError("--latency-mode uses every core in instances of "
                          f"{LATENCY_CORES} (or --ncores-per-instance); drop --ninstances")


def _shape(o: LaunchOptions, per_node: dict[int, list[int]], unit: str) -> tuple[int, int]:
    """(instances, cores per instance) from the options and the units available."""
    total = sum(len(v) for v in per_node.values())
    if o.throughput_mode:
        return len(per_node), 0  # 0: each takes its whole node
    if o.latency_mode:
        per = min(o.ncores_per_instance or LATENCY_CORES, total)
        return total // per, per
    n, per = o.ninstances, o.ncores_per_instance
    if n and per:
        if n * per > total:
            raise ConfigError(f"{n} instances x {per} {unit}s need {n * per} {unit}s but only "
                              f"{total} are usable here; lower --ninstances or "
                              f"--ncores-per-instance")
        return n, per
    if n:
        if n > total:
            raise ConfigError(f"--ninstances {n} is more than the {total} usable {unit}s; each "
                              f"instance needs at least one (use at most --ninstances {total})")
        return n, total // n
    if per:
        if per > total:
            raise ConfigError(f"--ncores-per-instance {per} is more than the {total} usable "
                              f"{unit}s here")
        return total // per, per
    return 1, total


def _allocate(o: LaunchOptions, per_node: dict[int, list[int]], n: int, per: int,
              unit: str) -> list[list[int]]:
    if o.throughput_mode:
        return [cpus for cpus in per_node.values()]
    if not o.skip_cross_node_cores:
        flat = [c for cpus in per_node.values() for c in cpus]
        return [flat[i * per:(i + 1) * per] for i in range(n)]
    groups = []
    for cpus in per_node.values():
        groups.extend(cpus[i * per:(i + 1) * per] for i in range(len(cpus) // per))
    if len(groups) < n:
        sizes = ", ".join(f"node {k}: {len(v)}" for k, v in per_node.items())
        raise ConfigError(f"with --skip-cross-node-cores only {len(groups)} instance(s) of {per} "
                          f"{unit}s fit ({unit}s per node: {sizes}); ask for fewer or drop "
                          f"--skip-cross-node-cores")
    return groups[:n]


def _allocator_env(o: LaunchOptions, machine: Machine, preload: list[str],
                   env: dict[str, str], notes: list[str], environ: Mapping[str, str]) -> str:
    choice = o.memory_allocator
    if choice == "auto":
        choice = next((a for a in ("jemalloc", "tcmalloc") if a in machine.allocators), "glibc")
        if choice == "glibc":
            notes.append("no jemalloc or tcmalloc found; glibc's malloc is set to keep freed "
                         "memory instead (" + INSTALL_HINT["jemalloc"] + ")")
    elif choice not in ("default", "glibc") and choice not in machine.allocators:
        raise ConfigError(f"--memory-allocator {choice} was asked for but lib{choice} was not "
                          f"found; {INSTALL_HINT[choice]}, or use --memory-allocator auto")
    if choice in ("jemalloc", "tcmalloc"):
        preload.append(machine.allocators[choice])
    if choice == "jemalloc":
        env["MALLOC_CONF"] = JEMALLOC_CONF
    if choice == "glibc":
        mine = sorted(k for k in GLIBC_TUNED if k in environ)
        if mine:  # the user's own malloc settings win, all of them (they work as a set)
            notes.append(f"{', '.join(mine)} already set: glibc's malloc left as configured")
        else:
            env.update(GLIBC_TUNED)
    return choice


def _omp_env(o: LaunchOptions, machine: Machine, preload: list[str], env: dict[str, str],
             notes: list[str]) -> str:
    choice = o.omp_runtime
    if choice == "auto":
        choice = "intel" if machine.iomp else "default"
    if choice == "intel":
        if not machine.iomp:
            raise ConfigError("--omp-runtime intel was asked for but libiomp5.so was not found; "
                              f"{INSTALL_HINT['intel']}, or use --omp-runtime default")
        preload.append(machine.iomp)
        env.update(KMP_AFFINITY="granularity=fine,compact,1,0", KMP_BLOCKTIME="1")
        notes.append("Intel OpenMP preloaded: cpuboost.runtime streams need the default "
                     "(GNU) OpenMP for their own core binding")
    return choice


def plan(topology: Topology, options: LaunchOptions = LaunchOptions(),
         machine: Machine = Machine(), environ: Mapping[str, str] | None = None) -> Plan:
    """Decide the instances and their environment. Raises ConfigError, before anything starts,
    for a request this machine cannot satisfy."""
    o = options
    _check_options(o)
    environ = dict(environ or {})
    notes: list[str] = []
    nodes = tuple(o.nodes_list) if o.nodes_list else topology.nodes
    missing = [n for n in nodes if n not in topology.nodes]
    if missing:
        raise ConfigError(f"--nodes-list names node(s) {missing} but this machine has NUMA "
                          f"node(s) {list(topology.nodes)}")
    unit = "logical CPU" if o.use_logical_cores else "physical core"
    per_node = {n: u for n, u in _units(topology, nodes, o.use_logical_cores).items() if u}
    if not per_node:
        raise ConfigError(f"no usable {unit}s on node(s) {list(nodes)} (offline, or outside this "
                          "process's affinity mask)")
    n, per = _shape(o, per_node, unit)
    groups = _allocate(o, per_node, n, per, unit)
    node_of = {c.id: c.node for c in topology.cpus}
    instances = []
    for i, cpus in enumerate(groups):
        inst_nodes = tuple(sorted({node_of[c] for c in cpus}))
        mem = inst_nodes[0] if len(inst_nodes) == 1 and o.bind_memory else None
        if len(inst_nodes) > 1:
            notes.append(f"instance {i} spans nodes {list(inst_nodes)} (memory not bound); "
                         "--skip-cross-node-cores keeps instances inside one node")
        instances.append(Instance(i, tuple(cpus), inst_nodes, mem))
    used = sum(len(g) for g in groups)
    total = sum(len(v) for v in per_node.values())
    if used < total:
        notes.append(f"{total - used} of {total} usable {unit}s are left unused by "
                     f"{len(groups)} instance(s)")
    if topology.offline:
        notes.append(f"cpus {format_cpulist(topology.offline)} are offline")
    if o.instance_idx is not None:
        if not 0 <= o.instance_idx < len(instances):
            raise ConfigError(f"--instance-idx {o.instance_idx} is outside the plan's "
                              f"{len(instances)} instance(s) (0..{len(instances) - 1})")
        instances = [instances[o.instance_idx]]

    env: dict[str, str] = {}
    preload: list[str] = []
    allocator = _allocator_env(o, machine, preload, env, notes, environ)
    omp = _omp_env(o, machine, preload, env, notes)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + [p for p in environ.get("LD_PRELOAD", "").split(":")
                                                if p and p not in preload])
    unset = []
    for var in THREAD_VARS[1:]:
        if var in environ:
            unset.append(var)
            notes.append(f"{var}={environ[var]} was set; removed so OMP_NUM_THREADS decides")
    if "OMP_NUM_THREADS" in environ:
        notes.append(f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} was set; each instance "
                     "gets its own count instead")
    if machine.numactl:
        binder = "numactl"
    elif machine.taskset:
        binder = "taskset"
    else:
        binder = "sched_setaffinity"
    if binder != "numactl" and len(topology.nodes) > 1 and o.bind_memory:
        notes.append("numactl not found: CPUs are bound but memory is not (first-touch); "
                     "install it with `apt-get install numactl`")
    return Plan(tuple(instances), env, tuple(unset), allocator, omp, binder, tuple(notes),
                len(groups))
