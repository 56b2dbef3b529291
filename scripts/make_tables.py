#!/usr/bin/env python
"""Turn a Hydra multirun directory into the ablation table (markdown + CSV) and a PQ-vs-GFLOPs plot.

    python scripts/make_tables.py multirun/2026-11-25/12-00-00      # a given sweep
    python scripts/make_tables.py --latest                         # the newest sweep under logs/ or multirun/

Failed jobs (a results.json with status "failed", or none at all) appear in the table as failures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proscale.reporting.ablation import write_tables

SWEEP_ROOTS = ("logs/multiruns", "multirun", "logs")


def latest_sweep(roots: tuple[str, ...] = SWEEP_ROOTS) -> Path:
    candidates = []
    for root in map(Path, roots):
        if root.is_dir():
            candidates += [p.parent for p in root.rglob("multirun.yaml")]
    if not candidates:
        raise SystemExit(f"no multirun found under {', '.join(roots)} (looked for multirun.yaml)")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="multirun directory of one sweep")
    parser.add_argument("--latest", action="store_true", help="use the most recent sweep")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    args = parser.parse_args(argv)
    if args.sweep_dir is None and not args.latest:
        parser.error("give a sweep directory or --latest")
    sweep = latest_sweep() if args.latest else args.sweep_dir
    try:
        paths = write_tables(sweep, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"{kind:>8}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
