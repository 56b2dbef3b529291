"""A Hydra multirun of 4 tiny jobs, one forced to fail: 3 results + 1 failure, each job with its own results.json
and its own (offline) W&B run; the sweep completes all jobs, then exits with status 1 and a summary of the failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the apps / launchers in subprocesses

REPO = Path(__file__).resolve().parent.parent


def test_multirun_with_one_failing_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "-m",
        "experiment=tiny",
        "num_threads=1",
        "trainer.enable_progress_bar=false",
        "data.num_train=2",
        "data.num_val=2",
        "steps=1",
        "callbacks.compute_stats.timing_runs=0",
        "logger=wandb",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep_dir}",
        # a negative learning rate is rejected when the optimizer is built: the 4th job fails mid-run
        "module.optimizer.lr=1e-3,2e-3,3e-3,-1",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    # all four jobs ran; the sweep's exit status and summary say one failed
    assert done.returncode == 1, done.stderr[-3000:]
    assert "multirun: 1 of 4 jobs did not succeed" in done.stderr
    assert "3 [module.optimizer.lr=-1]: failed: optimizer lr must be > 0" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["ok", "ok", "ok", "failed"]

    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    results = [json.loads((job / "results.json").read_text()) for job in jobs]
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "failed"]
    for job, result in zip(jobs[:3], results[:3]):
        assert 0.0 <= result["PQ"] <= 100.0 and 0.0 <= result["mIoU"] <= 100.0
        assert result["job"]["num"] == int(job.name) and result["output_dir"] == str(job)
        assert result["params"] > 0 and result["encoder_gflops"] > 0
    failed = results[3]
    assert "lr must be > 0" in failed["error"] and "module.optimizer.lr=-1" in failed["overrides"]
    assert failed["tags"]["encoder"] == "proscale"
    # One offline W&B run per job (wandb.finish() between jobs), including the failed one.
    runs = [sorted((job / "wandb").glob("offline-run-*")) for job in jobs]
    assert all(len(r) == 1 for r in runs)
    assert len({r[0].name.rsplit("-", 1)[-1] for r in runs}) == 4
