#!/usr/bin/env python
"""The ablation pipeline (`make ablation`, `make ablation-quick`): shared preparation once, the sweep in parallel
lanes, round-robin inference timing, then the table and the plot (proscale/reporting/ablation_run.py).

    python scripts/ablation.py experiment=cpu_ablation                    # 2 lanes of 1 thread on 2 cores
    python scripts/ablation.py --lanes 1 experiment=cpu_ablation          # the plain sequential multirun
    python scripts/ablation.py experiment=cpu_ablation_quick              # the smoke run (minutes)
    python scripts/ablation.py experiment=cpu_ablation model.backbone.model_name=resnet18

Every argument after the options is a Hydra override of scripts/train.py (sweeps included: 'seed=0,1').
"""

from __future__ import annotations

import argparse

from proscale.cli import CONFIG_DIR  # noqa: F401 -- sets PROJECT_ROOT and OMP_WAIT_POLICY before torch loads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and overrides in any order: `make ablation ARGS="steps=100 --no-timing"` puts the options after the
    Makefile's `experiment=...`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, default=2, help="parallel training processes (default 2; 1 = sequential)")
    parser.add_argument("--no-timing", action="store_true", help="skip the round-robin inference timing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=cpu_ablation steps=100")
    args = parser.parse_intermixed_args(argv)
    if args.lanes < 1:
        parser.error(f"--lanes must be >= 1, got {args.lanes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from proscale.reporting.ablation_run import run_ablation

    return run_ablation(args.overrides, lanes=args.lanes, time_models=not args.no_timing)


if __name__ == "__main__":
    raise SystemExit(main())
