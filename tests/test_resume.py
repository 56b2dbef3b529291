"""Fault test: a training process SIGKILLed mid-epoch resumes with `ckpt_path=last`, finishes, and ends with the
same weights as an uninterrupted run (CPU, same seed); no checkpoint or results file is ever half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from proscale.utils.safe_load import torch_load

REPO = Path(__file__).resolve().parent.parent

# 4 training images, batch 2: 2 steps per epoch; 3 epochs = 6 steps. Killed at step 3 = mid epoch 1.
COMMON = [
    "experiment=tiny",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
    "data.num_train=4",
    "data.num_val=2",
    "steps=6",
    "test=false",
    "callbacks.compute_stats.timing_runs=0",
]


def _run(log_dir: Path, data_dir: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        *COMMON,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch_load(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def _assert_complete_files(run_dir: Path) -> None:
    """Every checkpoint loads and results.json (if any) parses; no temporary files are left behind."""
    for checkpoint in run_dir.rglob("*.ckpt"):
        torch_load(checkpoint)
    for results in run_dir.rglob("results.json"):
        json.loads(results.read_text())
    assert not [p for p in run_dir.rglob(".*.tmp-*")]


# ~1 min on an idle 2-core machine (two training subprocesses); part of the default suite: it is the fault test
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    runs = log_dir / "train" / "runs" / "tiny"

    uninterrupted = runs / "a_uninterrupted"
    done = _run(log_dir, data_dir, uninterrupted)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = runs / "b_killed"
    crash = _run(
        log_dir,
        data_dir,
        killed,
        "+callbacks.fault._target_=proscale.lightning.callbacks.FaultInjection",
        "+callbacks.fault.kill_at_step=3",
    )
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    assert not (killed / "results.json").exists()  # died before the end: nothing claims to be final
    _assert_complete_files(killed)
    assert torch_load(killed / "checkpoints" / "last.ckpt")["global_step"] == 2  # end of epoch 0

    # `ckpt_path=last` picks the newest last.ckpt of this experiment: the killed run's (newer than a_uninterrupted).
    os.utime(killed / "checkpoints" / "last.ckpt")
    resumed = runs / "c_resumed"
    finish = _run(log_dir, data_dir, resumed, "ckpt_path=last")
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in finish.stdout + finish.stderr
    _assert_complete_files(resumed)
    assert json.loads((resumed / "results.json").read_text())["status"] == "ok"

    expected, actual = _weights(uninterrupted), _weights(resumed)
    assert torch_load(resumed / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert set(expected) == set(actual)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
