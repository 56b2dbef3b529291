"""Hydra entry point: `python scripts/export.py weights=... output=model.onnx [overrides]` (= `proscale-export`)."""

from proscale.cli import export_main

if __name__ == "__main__":
    export_main()
