"""Run by torchrun for every local rank (as a file, so nothing imports torch before the rank's
environment is set): bind this process to the rank's CPUs, set its environment (threads,
allocator preload), then exec the user's command in its place.

Usage (written by `cpuboost run`): rank.py -- command args...   with CPUBOOST_RANK_PLAN holding
a JSON list, one entry per local rank: {"cpus": [...], "env": {...}, "unset": [...],
"prefix": [...]}.
"""
import json
import os
import sys


def main(argv: list[str]) -> None:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("cpuboost rank entry: no command given")
    ranks = json.loads(os.environ["CPUBOOST_RANK_PLAN"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= len(ranks):
        sys.exit(f"cpuboost rank entry: LOCAL_RANK {local} but the plan has {len(ranks)} ranks")
    entry = ranks[local]
    env = dict(os.environ)
    for name in entry.get("unset", []):
        env.pop(name, None)
    env.update(entry["env"])
    env.pop("CPUBOOST_RANK_PLAN", None)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, entry["cpus"])
    argv = list(entry.get("prefix", [])) + argv  # numactl, to bind memory as well
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
