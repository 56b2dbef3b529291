"""Hydra callbacks (registered in ``conf/hydra/default.yaml``).

:class:`MultirunSummary`: a sweep keeps going when one of its jobs fails (``ignore_failures``, see
:mod:`proscale.utils.task`), so without it a sweep with failed jobs exited 0 and the failures hid in the jobs'
``results.json``. At the end of every multirun it reads each job's ``results.json``, writes
``<sweep dir>/sweep_summary.json`` (every job's status and error), prints the failed jobs and exits with status 1
when any job failed, was interrupted or left no results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from proscale.utils.io import atomic_write_json
from proscale.utils.results import RESULTS_FILENAME

SUMMARY_FILENAME = "sweep_summary.json"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (those holding Hydra's ``.hydra`` record), in job-number order when numeric."""
    dirs = {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    return sorted(dirs, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, str(p)))


def job_summary(job_dir: Path) -> dict[str, Any]:
    """One job's status, overrides and error from its ``results.json`` ("missing" when the job left none)."""
    entry: dict[str, Any] = {"dir": str(job_dir), "status": "missing", "error": "no results.json (killed?)"}
    try:
        import yaml

        entry["overrides"] = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except Exception:
        entry["overrides"] = []
    results_path = job_dir / RESULTS_FILENAME
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text())
            entry["status"], entry["error"] = results.get("status", "unknown"), results.get("error")
        except (json.JSONDecodeError, OSError) as error:
            entry["status"], entry["error"] = "unreadable", f"{results_path}: {error}"
    return entry


class MultirunSummary(Callback):
    """Summarise a multirun's jobs; exit with status 1 when any of them did not end "ok"."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        jobs = [job_summary(d) for d in job_dirs(sweep_dir)]
        if not jobs:
            return
        atomic_write_json(sweep_dir / SUMMARY_FILENAME, {"jobs": jobs})
        bad = [job for job in jobs if job["status"] != "ok"]
        if not bad:
            return
        lines = [
            f"multirun: {len(bad)} of {len(jobs)} jobs did not succeed (all jobs: {sweep_dir / SUMMARY_FILENAME}):"
        ]
        shared = set.intersection(*(set(job["overrides"]) for job in jobs))  # name a job by what the sweep varied
        for job in bad:
            overrides = " ".join(o for o in job["overrides"] if o not in shared)
            lines.append(f"  {Path(job['dir']).name} [{overrides}]: {job['status']}: {job['error']}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)
