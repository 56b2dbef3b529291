"""Hydra entry point: `python scripts/predict.py [overrides]` (same as the `proscale-predict` console script)."""

from proscale.cli import predict_main

if __name__ == "__main__":
    predict_main()
