#!/usr/bin/env python
"""Turn a Hydra multirun directory into the ablation table (markdown + CSV) and a PQ-vs-GFLOPs plot.

    python scripts/make_tables.py multirun/2026-11-25/12-00-00      # a given sweep
    python scripts/make_tables.py --latest                         # the newest sweep under logs/ or multirun/
    python scripts/make_tables.py --latest --time                  # + round-robin inference timing first

A sweep of `make ablation` (scripts/ablation.py) keeps its lanes in lane<k>/ subfolders: --latest names the sweep
folder above them. --time writes inference_timing.json (sizes and repeats from the jobs' `ablation.timing`).

Failed jobs (a results.json with status "failed", or none at all) appear in the table as failures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proscale.reporting.ablation import write_tables

SWEEP_ROOTS = ("logs/multiruns", "multirun", "logs")


def _sweep_of(folder: Path) -> Path:
    """A lane of scripts/ablation.py (``<sweep>/lane<k>`` beside ``<sweep>/lane<k>.log``) belongs to its sweep."""
    if folder.name.startswith("lane") and (folder.parent / f"{folder.name}.log").exists():
        return folder.parent
    return folder


def latest_sweep(roots: tuple[str, ...] = SWEEP_ROOTS) -> Path:
    candidates = []
    for root in map(Path, roots):
        if root.is_dir():
            candidates += [_sweep_of(p.parent) for p in root.rglob("multirun.yaml")]
    if not candidates:
        raise SystemExit(f"no multirun found under {', '.join(roots)} (looked for multirun.yaml)")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def time_sweep(sweep: Path) -> Path:
    """Round-robin inference timing of the sweep's configurations (settings: the first job's ``ablation.timing``)."""
    import yaml

    from proscale.reporting.ablation import find_job_dirs, load_job
    from proscale.reporting.ablation_run import TIMING_DEFAULTS
    from proscale.reporting.inference_timing import time_configurations, write_timing

    dirs = find_job_dirs(sweep)
    cfg = yaml.safe_load((dirs[0] / ".hydra" / "config.yaml").read_text()) or {}
    settings = {**TIMING_DEFAULTS, **((cfg.get("ablation") or {}).get("timing") or {})}
    run_size = ((cfg.get("callbacks") or {}).get("compute_stats") or {}).get("image_size") or settings["paper_size"]
    sizes = [list(run_size)] + ([settings["paper_size"]] if list(settings["paper_size"]) != list(run_size) else [])
    payload = time_configurations(
        [load_job(d) for d in dirs], sizes, int(settings["warmup"]), int(settings["repeats"]), int(settings["threads"])
    )
    return write_timing(sweep, payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="multirun directory of one sweep")
    parser.add_argument("--latest", action="store_true", help="use the most recent sweep")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    parser.add_argument("--time", action="store_true", help="time every configuration round-robin first")
    args = parser.parse_args(argv)
    if args.sweep_dir is None and not args.latest:
        parser.error("give a sweep directory or --latest")
    sweep = latest_sweep() if args.latest else args.sweep_dir
    try:
        if args.time:
            time_sweep(sweep)
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
