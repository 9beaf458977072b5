"""`cpuboost doctor [--json]`: check this machine and environment for cpuboost."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="report CPU features, topology, torch build, environment "
                                      "problems and which cpuboost features are fast here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main)


def main(args) -> int:
    from cpuboost.doctor import collect, format_report
    report = collect()
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1
