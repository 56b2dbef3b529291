"""Hydra entry point: `python scripts/train.py [overrides]` (same as the `proscale-train` console script)."""

from proscale.cli import train_main

if __name__ == "__main__":
    train_main()
