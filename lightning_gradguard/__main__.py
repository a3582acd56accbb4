"""Command line: ``python -m lightning_gradguard report LOGDIR [-o report.html]`` (also ``gradguard report``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0: done, 1: an error, said on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_gradguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page from a run's TensorBoard logs",
        description="Turn the TensorBoard event files under LOGDIR into one self-contained HTML page: "
        "the gradient-flow pictures, the findings, a per-layer table of gradient norms.",
    )
    report.add_argument("logdir", metavar="LOGDIR", help="a TensorBoard log folder (a run, or a folder of runs)")
    report.add_argument("-o", "--output", help="the HTML file to write (default: LOGDIR/gradguard_report.html)")
    args = parser.parse_args(argv)

    from lightning_gradguard.report import NoGradGuardData, write_report

    try:
        path = write_report(args.logdir, args.output)
    except NoGradGuardData as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
