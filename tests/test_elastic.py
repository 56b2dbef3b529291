"""Fault tolerance of launched runs: a worker SIGKILLed under `torchrun --max-restarts 1`, and SLURM's pre-timeout
requeue signal (SIGUSR1, Lightning's `SLURMEnvironment(auto_requeue=True)`) with the SLURM environment faked.

In both cases the restarted (requeued) run finds its own run folder (named after the launch, not a timestamp:
`torchrun-<rdzv id>`, `slurm-<job id>`) and continues from its own newest checkpoint without `ckpt_path`,
ending at the configured number of optimizer steps with one results.json and no corrupted or duplicated files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.launch import (
    TRAIN,
    assert_complete_files,
    child_env,
    free_port,
    global_step,
    python,
    run,
    short_run,
    torchrun,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # training subprocesses: ~1-2 min each on an idle 2-core machine

# 4 training images; 2 steps per epoch (global batch 2); 6 steps = 3 epochs; last.ckpt at the end of each epoch.
STEPS = 6


def _overrides(tmp: Path) -> list[str]:
    return short_run(tmp, num_train=4, steps=STEPS)


def _results(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("results.json"))


def test_sigkilled_worker_restarts_group_and_resumes_own_checkpoint(tmp_path):
    port = free_port()
    args = ["--nproc-per-node", "2", "--max-restarts", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    script = [
        TRAIN,
        *_overrides(tmp_path),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.num_nodes=1",
        "trainer.precision=32",
        "data.batch_size=1",
        # rank 1 dies at step 3 (mid epoch 1, after last.ckpt of step 2) in the first attempt only
        "+callbacks.fault._target_=proscale.lightning.callbacks.FaultInjection",
        "+callbacks.fault.kill_at_step=3",
        "+callbacks.fault.rank=1",
        "+callbacks.fault.attempt=0",
    ]
    code, output = run(torchrun(*args, "--rdzv-id", "elastic1", *script), timeout=900)
    assert code == 0, output[-5000:]

    run_dir = tmp_path / "logs" / "train" / "runs" / "tiny" / "torchrun-elastic1"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["torchrun-elastic1"]
    log = (run_dir / "train.log").read_text()
    # the first attempt started with an empty folder: a resume means it died and the group was restarted
    assert log.count("resuming this run's own checkpoint") == 1
    assert f"resuming this run's own checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == STEPS
    assert_complete_files(run_dir)
    assert _results(run_dir) == [run_dir / "results.json"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"


def _fake_slurm_env(tmp: Path, job_id: str, restart: int) -> dict[str, str]:
    """What srun sets for a 1-node, 1-task job; PATH without `scontrol`, so the requeue command itself fails."""
    env = child_env(
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="train",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODELIST="localhost",
        SLURM_RESTART_COUNT=str(restart),
    )
    python_dir = str(Path(shutil.which("python3") or "/usr/bin/python3").parent)
    env["PATH"] = os.pathsep.join(p for p in [python_dir, "/usr/bin", "/bin"] if not Path(p, "scontrol").exists())
    return env


def test_slurm_requeue_signal_saves_checkpoint_and_requeued_job_resumes(tmp_path):
    run_dir = tmp_path / "logs" / "train" / "runs" / "tiny" / "slurm-4242"
    first = [
        TRAIN,
        *_overrides(tmp_path),
        # SIGUSR1 at step 3 (SLURM's --signal=USR1@<s> before the time limit), then the time limit's SIGKILL
        "+callbacks.requeue_signal._target_=proscale.testing.callbacks.SendSignal",
        "+callbacks.requeue_signal.at_step=3",
        "+callbacks.time_limit._target_=proscale.lightning.callbacks.FaultInjection",
        "+callbacks.time_limit.kill_at_step=3",
    ]
    code, output = run(python(*first), env=_fake_slurm_env(tmp_path, "4242", restart=0))
    assert code == -9, output[-5000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_file(), sorted(run_dir.rglob("*"))
    assert global_step(hpc) == 3 and global_step(run_dir / "checkpoints" / "last.ckpt") == 2
    assert not _results(run_dir)  # killed before the end: nothing claims to be final
    assert_complete_files(run_dir)

    # the requeued job: same job id, same command, no ckpt_path
    code, output = run(python(TRAIN, *_overrides(tmp_path)), env=_fake_slurm_env(tmp_path, "4242", restart=1))
    assert code == 0, output[-5000:]
    assert f"resuming this run's own checkpoint {hpc}" in (run_dir / "train.log").read_text()
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == STEPS
    assert_complete_files(run_dir)
    assert _results(run_dir) == [run_dir / "results.json"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
