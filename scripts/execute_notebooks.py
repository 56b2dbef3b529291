"""Execute the notebooks in place (``make notebooks``), so the repository stores them with their outputs and the
figures show when browsing it. Each runs on its default settings, from the ``notebooks`` folder; the file is
replaced atomically only when every cell ran. ``tests/test_notebooks.py`` executes them too, on smaller settings,
and checks that the stored copies carry their figures.

Usage: ``python scripts/execute_notebooks.py [NAME.ipynb ...] [--timeout SECONDS]`` (default: every notebook).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from proscale.utils.io import atomic_write_text

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute_in_place(path: Path, timeout: int) -> float:
    """Run every cell of ``path`` in a fresh kernel and store the outputs in the file; returns the seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="proscale_nb_") as workdir:
        os.environ["PROSCALE_WORKDIR"] = workdir  # generated data and logs, removed afterwards
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
    text = nbformat.writes(notebook)
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks/NAME.ipynb to run (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [NOTEBOOKS / Path(name).name for name in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    for path in paths:
        seconds = execute_in_place(path, args.timeout)
        print(f"{path.relative_to(NOTEBOOKS.parent)}: executed in place ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
