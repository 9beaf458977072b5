"""`cpuboost` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cpuboost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from cpuboost.cli import bench, doctor, run
    bench.add_parser(sub)
    doctor.add_parser(sub)
    run.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
