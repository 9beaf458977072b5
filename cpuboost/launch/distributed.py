"""`cpuboost run --nnodes/--nproc-per-node`: hand off to torchrun (torch.distributed, gloo on
CPU) with every local rank bound to its own share of this node's cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from cpuboost.errors import ConfigError
from cpuboost.launch.execute import BIND_ENTRY, exit_code
from cpuboost.launch.plan import Machine, Plan


@dataclass(frozen=True)
class DistributedOptions:
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500


def check(d: DistributedOptions) -> None:
    if d.nnodes < 1 or d.nproc_per_node < 1:
        raise ConfigError(f"--nnodes ({d.nnodes}) and --nproc-per-node ({d.nproc_per_node}) "
                          "must be at least 1")
    if not 0 <= d.node_rank < d.nnodes:
        raise ConfigError(f"--node-rank {d.node_rank} must be in 0..{d.nnodes - 1} "
                          f"for --nnodes {d.nnodes}")
    if d.nnodes > 1 and not d.master_addr:
        raise ConfigError(f"--nnodes {d.nnodes} needs --master-addr (the address of the node "
                          "with --node-rank 0, reachable from every node)")


def rank_plan(plan: Plan, machine: Machine) -> list[dict]:
    """Per local rank: its CPUs, environment, and the binding prefix (numactl, for memory)."""
    return [{"cpus": list(i.cpus), "env": plan.instance_env(i), "unset": list(plan.unset),
             "prefix": plan.binding_command(i, machine) if plan.binder == "numactl" else []}
            for i in plan.instances]


def torchrun_command(d: DistributedOptions, command: list[str],
                     log_dir: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={d.nnodes}",
           f"--nproc-per-node={d.nproc_per_node}"]
    if log_dir:  # torchrun's own per-rank files (<log_dir>/<run id>/attempt_0/<rank>/), teed
        cmd += [f"--log-dir={log_dir}", "--tee=3"]
    if d.nnodes == 1 and not d.master_addr:
        cmd.append("--standalone")
    else:
        cmd += [f"--node-rank={d.node_rank}", f"--master-addr={d.master_addr}",
                f"--master-port={d.master_port}"]
    # torchrun starts `python -u rank.py -- command...`: the entry binds, then execs `command`
    return cmd + [str(BIND_ENTRY), "--", *command]


def run(plan: Plan, machine: Machine, d: DistributedOptions, command: list[str],
        log_dir: str | None = None) -> int:
    env = dict(os.environ)
    env["CPUBOOST_RANK_PLAN"] = json.dumps(rank_plan(plan, machine))
    # torchrun warns and sets 1 when OMP_NUM_THREADS is unset; every rank gets its own anyway
    env["OMP_NUM_THREADS"] = str(plan.instances[0].threads)
    return exit_code(subprocess.call(torchrun_command(d, command, log_dir), env=env))
