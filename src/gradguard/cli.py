"""The ``gradguard`` command.

    gradguard report RUN [RUN ...] -o report.html   # an offline HTML report, runs side by side
    gradguard summary RUN [RUN ...]                 # findings, remedies and a text timeline

Bad input gets one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from gradguard import report, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradguard", description="gradguard: look at a run's gradient flow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("report", help="write an offline HTML report of one or more runs",
                       description=report.__doc__.splitlines()[0])
    report.add_arguments(p)
    p.set_defaults(func=report.run_command)
    p = sub.add_parser("summary", help="print findings, remedies and a text timeline",
                       description=summary.__doc__.splitlines()[0])
    summary.add_arguments(p)
    p.set_defaults(func=summary.run_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
