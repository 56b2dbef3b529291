"""``task_wrapper``: the one place that turns a finished or failed task into ``results.json`` and closes W&B."""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from proscale.utils.logging_utils import get_logger
from proscale.utils.results import write_results
from proscale.utils.run_info import hydra_runtime, run_tags

log = get_logger(__name__)


def _finish_wandb(exit_code: int) -> None:
    """Close the W&B run (if any) so the next multirun job starts its own."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception as error:  # closing the logger must never turn a finished run into a failed one
            log.warning(f"wandb.finish failed: {type(error).__name__}: {error}")


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def failure_results(cfg: DictConfig, error: BaseException, wall_time_s: float) -> dict[str, Any]:
    info = hydra_runtime()
    try:
        tags = run_tags(cfg)
    except Exception:  # a config broken enough to fail may also break tag extraction
        tags = {}
    return {
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(limit=20),
        "task_name": cfg.get("task_name"),
        "experiment": cfg.get("experiment_name"),
        "output_dir": info.get("output_dir"),
        "overrides": info.get("overrides", []),
        "job": info.get("job"),
        "tags": tags,
        "wall_time_s": wall_time_s,
    }


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable[[DictConfig], tuple[dict, dict]]:
    """Run ``task(cfg)``; on failure write ``results.json`` with ``status: failed`` and the error.

    A failure is re-raised unless ``cfg.ignore_failures`` is true; ``null`` (the default) means true in multirun
    sweeps, so one failing job neither aborts the sweep nor drops the other jobs' results, and false otherwise.
    W&B is always finished.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        start = time.perf_counter()
        try:
            metrics, objects = task(cfg)
        except BaseException as error:
            log.exception(f"{cfg.get('task_name', 'task')} failed")
            output_dir = hydra_runtime().get("output_dir") or cfg.get("paths", {}).get("output_dir")
            if output_dir and _is_rank_zero():
                path = write_results(output_dir, failure_results(cfg, error, time.perf_counter() - start))
                log.info(f"results (failed): {Path(path).resolve()}")
            _finish_wandb(exit_code=1)
            ignore = cfg.get("ignore_failures")
            if ignore is None:
                ignore = hydra_runtime().get("mode", "").endswith("MULTIRUN")
            if isinstance(error, Exception) and ignore:
                return {"status": "failed", "error": str(error)}, {}
            raise
        _finish_wandb(exit_code=0)
        return metrics, objects

    return wrapped
