"""Hydra entry point: `python scripts/eval.py [overrides]` (same as the `proscale-eval` console script)."""

from proscale.cli import eval_main

if __name__ == "__main__":
    eval_main()
