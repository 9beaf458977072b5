"""`cpuboost run [options] script.py args...` / `cpuboost run [options] -m module args...`."""
from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="start a script as one or more instances bound to cores, with tuned "
                    "threads and allocator",
        description="Plan instances from this machine's topology (see --dry-run), then start "
                    "each bound to its cores and memory node with OMP_NUM_THREADS and the "
                    "allocator set. --nproc-per-node/--nnodes hand off to torchrun.")
    p.add_argument("--ninstances", type=int, default=0, help="number of instances (default: 1, "
                   "or decided by the mode)")
    p.add_argument("--ncores-per-instance", type=int, default=0,
                   help="cores per instance (default: the usable cores split evenly)")
    p.add_argument("--nodes-list", help="comma-separated NUMA nodes to use (default: all)")
    p.add_argument("--use-logical-cores", action="store_true",
                   help="count hyper-threads as cores (default: one thread per physical core)")
    p.add_argument("--skip-cross-node-cores", action="store_true",
                   help="never let an instance span two NUMA nodes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--latency-mode", action="store_true",
                      help="instances of 4 cores each over all cores")
    mode.add_argument("--throughput-mode", action="store_true",
                      help="one instance per NUMA node, using all its cores")
    p.add_argument("--memory-allocator", default="auto",
                   choices=["auto", "default", "jemalloc", "tcmalloc", "glibc"],
                   help="preload this allocator (auto: jemalloc, else tcmalloc, else glibc's "
                        "malloc set to keep freed memory; default: leave glibc's as it is)")
    p.add_argument("--omp-runtime", default="default", choices=["auto", "default", "intel"],
                   help="OpenMP runtime (default: the one torch ships; intel preloads libiomp5)")
    p.add_argument("--instance-idx", type=int, help="start only this instance of the plan")
    p.add_argument("--no-membind", action="store_true",
                   help="do not bind each instance's memory to its NUMA node")
    p.add_argument("--log-dir", help="write each instance's output to a file here")
    p.add_argument("--log-file-prefix", default="run", help="prefix of the log file names")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and environment and start nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    d = p.add_argument_group("multi-process (torch.distributed via torchrun)")
    d.add_argument("--nnodes", type=int, default=1, help="number of hosts")
    d.add_argument("--nproc-per-node", type=int, default=0, help="ranks on this host")
    d.add_argument("--node-rank", type=int, default=0, help="this host's rank")
    d.add_argument("--master-addr", help="address of the rank-0 host")
    d.add_argument("--master-port", type=int, default=29500)
    p.add_argument("-m", "--module", action="store_true", help="program is a module (python -m)")
    p.add_argument("--no-python", action="store_true",
                   help="program is an executable, not a Python script")
    p.add_argument("program", nargs="?", help="script, module (with -m) or executable")
    p.add_argument("program_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=main)


def _options(args):
    from cpuboost.errors import ConfigError
    from cpuboost.launch.plan import LaunchOptions
    nodes = None
    if args.nodes_list:
        try:
            nodes = tuple(int(n) for n in args.nodes_list.split(",") if n.strip())
        except ValueError:
            raise ConfigError(f"--nodes-list {args.nodes_list!r} must be comma-separated node "
                              "numbers, e.g. 0,1") from None
    ninstances = args.ninstances
    if args.nproc_per_node:
        if ninstances and ninstances != args.nproc_per_node:
            raise ConfigError(f"--ninstances {ninstances} and --nproc-per-node "
                              f"{args.nproc_per_node} disagree; give one of them")
        ninstances = args.nproc_per_node
    return LaunchOptions(
        ninstances=ninstances, ncores_per_instance=args.ncores_per_instance, nodes_list=nodes,
        use_logical_cores=args.use_logical_cores, skip_cross_node_cores=args.skip_cross_node_cores,
        latency_mode=args.latency_mode, throughput_mode=args.throughput_mode,
        memory_allocator=args.memory_allocator, omp_runtime=args.omp_runtime,
        instance_idx=args.instance_idx, bind_memory=not args.no_membind)


def main(args) -> int:
    from cpuboost.errors import ConfigError
    from cpuboost.hw.topology import read_topology
    from cpuboost.launch import distributed, execute
    from cpuboost.launch.plan import plan
    try:
        machine = execute.find_machine()
        the_plan = plan(read_topology(), _options(args), machine, os.environ)
        dist = None
        if args.nproc_per_node or args.nnodes > 1:
            dist = distributed.DistributedOptions(args.nnodes, args.nproc_per_node or 1,
                                                  args.node_rank, args.master_addr,
                                                  args.master_port)
            distributed.check(dist)
            if args.instance_idx is not None:
                raise ConfigError("--instance-idx selects one instance; torchrun starts every "
                                  "rank, so it cannot be combined with --nproc-per-node/--nnodes")
        if not args.program and not args.dry_run:
            raise ConfigError("no program given: cpuboost run [options] script.py [args] "
                              "(or -m module [args])")
    except ConfigError as e:
        print(f"cpuboost run: {e}", file=sys.stderr)
        return 2
    command = execute.python_command(args.program or "<program>", args.program_args,
                                     args.module, args.no_python)
    if args.dry_run:
        if args.json:
            print(the_plan.to_json())
            return 0
        print(the_plan.describe())
        if dist:
            print("  command: " + " ".join(distributed.torchrun_command(dist, command,
                                                                        args.log_dir)))
        else:
            for inst in the_plan.instances:
                print(f"  command[{inst.index}]: "
                      + " ".join(execute.instance_command(the_plan, inst, machine, command)))
        return 0
    print(the_plan.describe(), file=sys.stderr)
    if dist:
        return distributed.run(the_plan, machine, dist, command, args.log_dir)
    return execute.execute(the_plan, machine, command, args.log_dir, args.log_file_prefix)
