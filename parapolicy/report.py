"""Gather eval summaries (e.g. a Hydra multirun) into one table and plot.

    python -m parapolicy.report multirun/eval/square/2026-11-22_10-00-00

Reads every ``summary.json`` below the folder; prints one row per (run directory, sampler) with its
schedule length (``steps``) and timestep spacing, and writes
``report.json`` and ``report.png`` (p50 speedup over the baseline and success rate, against whatever
the sweep varied: tolerance, steps or window; one line per sampler and value of the other varied
options) into the folder; for a real-time sweep (``-m timing=async
latency=0,50,100,200``) also ``realtime.png``: success and task time against latency.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from parapolicy.evaluation.sweeps import collect_rows, format_realtime_rows, format_rows, plot_realtime, plot_rows

    parser = argparse.ArgumentParser(prog="python -m parapolicy.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder holding eval summary.json files (any depth)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a directory")
    rows = collect_rows(args.folder)
    if not rows:
        parser.error(f"no summary.json below {args.folder}")
    print(format_rows(rows))
    realtime = format_realtime_rows(rows)
    if realtime:
        print("\nreal time:\n" + realtime)
    (args.folder / "report.json").write_text(json.dumps(rows, indent=2))
    plot_rows(rows, args.folder / "report.png")
    print(f"wrote {args.folder / 'report.json'} and {args.folder / 'report.png'}")
    if plot_realtime(rows, args.folder / "realtime.png"):
        print(f"wrote {args.folder / 'realtime.png'} (success and task time against latency)")


if __name__ == "__main__":
    main()
