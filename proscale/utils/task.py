"""``task_wrapper``: the one place that turns a finished or failed task into ``results.json`` and closes W&B."""

from __future__ import annotations

import functools
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from proscale.utils.config_check import check_config
from proscale.utils.logging_utils import get_logger
from proscale.utils.results import write_results
from proscale.utils.run_info import hydra_runtime, run_tags
from proscale.utils.threads import set_num_threads

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


class TrainingInterrupted(BaseException):
    """SIGINT/SIGTERM stopped training at a step boundary after a resumable checkpoint was written.

    A ``BaseException`` (like ``KeyboardInterrupt``, which it replaces) so that no ``except Exception`` swallows it
    and an interrupted sweep stops instead of starting its next job. ``exit_code`` follows the shell convention
    (128 + signal number: 130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signal_name: str, exit_code: int, checkpoint: str | None, step: int) -> None:
        super().__init__(f"interrupted by {signal_name} after step {step}")
        self.signal_name, self.exit_code, self.checkpoint, self.step = signal_name, exit_code, checkpoint, step


def show_tracebacks(cfg: DictConfig | None = None) -> bool:
    """Whether failures print their traceback: ``HYDRA_FULL_ERROR=1`` or ``extras.full_traceback=true``."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    try:
        return bool(cfg is not None and (cfg.get("extras") or {}).get("full_traceback"))
    except Exception:
        return False


def error_message(error: BaseException) -> str:
    """One line (or a short list) that says what went wrong: the error's own message, without the traceback.

    Hydra wraps errors raised while instantiating a ``_target_`` ("Error in call to target ..."); the original
    error, when there is one, says more.
    """
    cause = error
    while type(cause).__name__ == "InstantiationException" and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip() or type(cause).__name__
    return text if isinstance(cause, ValueError) else f"{type(cause).__name__}: {text}"


def interrupted_by(error: BaseException) -> TrainingInterrupted | None:
    """The interruption behind ``error``: ours, a bare KeyboardInterrupt, or Lightning's ``sys.exit(1)`` after
    one (its handler for Ctrl+C outside our step-boundary handling)."""
    if isinstance(error, TrainingInterrupted):
        return error
    if isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and isinstance(error.__context__, KeyboardInterrupt)
    ):
        return TrainingInterrupted("SIGINT", 130, None, -1)
    if type(error).__name__ == "SIGTERMException":
        return TrainingInterrupted("SIGTERM", 143, None, -1)
    return None


def failure_results(cfg: DictConfig, error: BaseException, wall_time_s: float) -> dict[str, Any]:
    info = hydra_runtime()
    try:
        tags = run_tags(cfg)
    except Exception:  # a config broken enough to fail may also break tag extraction
        tags = {}
    interruption = interrupted_by(error)
    results = {
        "status": "failed",
        "error": error_message(error),
        "traceback": traceback.format_exc(limit=20),
        "task_name": cfg.get("task_name"),
        "experiment": cfg.get("experiment_name"),
        "output_dir": info.get("output_dir"),
        "overrides": info.get("overrides", []),
        "job": info.get("job"),
        "tags": tags,
        "wall_time_s": wall_time_s,
    }
    if interruption is not None:
        results.update(
            status="interrupted",
            error=None,
            signal=interruption.signal_name,
            checkpoint=interruption.checkpoint,
            step=interruption.step if interruption.step >= 0 else None,
            traceback=None,
        )
    return results


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable[[DictConfig], tuple[dict, dict]]:
    """Check the config (:mod:`proscale.utils.config_check`), run ``task(cfg)``; on failure write
    ``results.json`` with ``status: failed`` and the error (``status: interrupted`` after SIGINT/SIGTERM).

    A failure is logged as one line (the traceback is in ``results.json``, and printed with ``HYDRA_FULL_ERROR=1``
    or ``extras.full_traceback=true``) and re-raised unless ``cfg.ignore_failures`` is true; ``null`` (the
    default) means true in multirun sweeps, so one failing job neither aborts the sweep nor drops the other jobs'
    results, and false otherwise. Interruptions are always re-raised. W&B is always finished.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        start = time.perf_counter()
        try:
            check_config(cfg)
            set_num_threads(cfg.get("num_threads"))  # every app, whatever its task does
            metrics, objects = task(cfg)
        except BaseException as error:
            name = cfg.get("task_name", "task")
            interruption = interrupted_by(error)
            if interruption is not None:
                log.warning(
                    f"{name} {interruption}"
                    + (f"; checkpoint: {interruption.checkpoint}" if interruption.checkpoint else "")
                )
            else:  # the traceback: results.json, and the terminal with HYDRA_FULL_ERROR=1 (printed by Hydra, once)
                log.error(f"{name} failed: {error_message(error)}")
            output_dir = hydra_runtime().get("output_dir") or cfg.get("paths", {}).get("output_dir")
            if output_dir and _is_rank_zero() and not getattr(error, "results_written", False):
                status = "interrupted" if interruption is not None else "failed"
                path = write_results(output_dir, failure_results(cfg, error, time.perf_counter() - start))
                log.info(f"results ({status}): {Path(path).resolve()}")
            error.reported = True  # type: ignore[attr-defined]  # the CLI prints no second message
            _finish_wandb(exit_code=1)
            ignore = cfg.get("ignore_failures")
            if ignore is None:
                ignore = hydra_runtime().get("mode", "").endswith("MULTIRUN")
            if isinstance(error, Exception) and ignore:
                return {"status": "failed", "error": error_message(error)}, {}
            raise
        _finish_wandb(exit_code=0)
        return metrics, objects

    return wrapped
