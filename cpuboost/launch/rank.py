"""Bind, then exec: the entry every instance starts through when it must be bound by this
process itself. Run as a file (nothing imports torch before the environment is set).

  rank.py --cpus 0-3 -- command args...     bind to these CPUs (no taskset/numactl on the host)
  rank.py -- command args...                 under torchrun: CPUBOOST_RANK_PLAN holds a JSON list,
                                             one entry per local rank, {"cpus", "env", "unset",
                                             "prefix"}; LOCAL_RANK picks the entry
"""
import json
import os
import sys


def _cpus(text: str) -> list[int]:
    # the kernel list format, as cpuboost.hw.topology reads it; this file imports nothing of
    # cpuboost (which would import torch before the environment is set)
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv: list[str]) -> None:
    cpus = None
    if argv[:1] == ["--cpus"]:
        cpus, argv = _cpus(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("cpuboost bind entry: no command given")
    env = dict(os.environ)
    if cpus is None:
        ranks = json.loads(os.environ["CPUBOOST_RANK_PLAN"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= len(ranks):
            sys.exit(f"cpuboost rank entry: LOCAL_RANK {local} but the plan has {len(ranks)} "
                     "ranks")
        entry = ranks[local]
        for name in entry.get("unset", []):
            env.pop(name, None)
        env.update(entry["env"])
        env.pop("CPUBOOST_RANK_PLAN", None)
        cpus = entry["cpus"]
        argv = list(entry.get("prefix", [])) + argv  # numactl, to bind memory as well
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main(sys.argv[1:])
