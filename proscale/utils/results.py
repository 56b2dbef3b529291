"""``results.json``: the one file every run (single or multirun job) leaves in its output directory.

Schema (all metric values on the 0-100 scale; missing quantities are ``null``)::

    {
      "status": "ok" | "failed",
      "error": null | "ExceptionType: message",        # failed runs only
      "task_name": "train" | "eval",
      "experiment": "cpu_synthetic",                   # cfg.experiment_name
      "output_dir": "/abs/path/of/the/run",
      "overrides": ["model/encoder=proscale", ...],    # this job's Hydra overrides
      "job": {"num": 3, "sweep_dir": "..."} | null,    # multirun jobs only
      "tags": {"encoder": "proscale", "schedule": "3-3-3", "backbone": "...", "lpe": true, "seed": 1},
      "PQ": 41.2, "SQ": ..., "RQ": ..., "PQ_th": ..., "PQ_st": ..., "AP": ..., "mIoU": ...,
      "metrics": {"test/PQ": 41.2, "val/PQ": ..., "train/loss": ...},   # every final logged metric
      "split": "test",                                 # which split the top-level metrics come from
      "encoder_gflops": 12.3, "total_gflops": 45.6, "params": 1234567, "ms_per_img": 88.0,
      "wall_time_s": 512.3, "best_checkpoint": "/.../epoch_009.ckpt" | null
    }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from proscale.utils.io import atomic_write_json

RESULTS_FILENAME = "results.json"

# Top-level metric keys copied from the logged ``{split}/{name}`` metrics.
HEADLINE_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
HEADLINE_METRICS += ("AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU", "pAcc")
COMPUTE_KEYS = ("encoder_gflops", "total_gflops", "params", "ms_per_img")


def headline_metrics(metrics: dict[str, float]) -> tuple[str | None, dict[str, float]]:
    """Pick the final metrics: ``test/*`` when a test ran, else ``val/*``. Returns (split, {name: value})."""
    for split in ("test", "val"):
        picked = {name: float(metrics[f"{split}/{name}"]) for name in HEADLINE_METRICS if f"{split}/{name}" in metrics}
        if picked:
            return split, picked
    return None, {}


def write_results(output_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Atomically write ``results`` as ``<output_dir>/results.json`` and return the path."""
    return atomic_write_json(Path(output_dir) / RESULTS_FILENAME, results)


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``results.json`` (a file or a run directory); a clear error when it is missing or corrupt."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILENAME
    if not path.is_file():
        raise ValueError(f"no {RESULTS_FILENAME} at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
