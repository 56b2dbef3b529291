"""Fault tests: a training process SIGKILLed (at a step or at random moments) or interrupted with SIGINT/SIGTERM
resumes with `ckpt_path=last`, finishes, and ends with the same weights (and EMA weights) as an uninterrupted run
(CPU, same seed, a poly LR schedule); no checkpoint, results or CSV log file is ever half-written."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from proscale.utils.safe_load import torch_load

pytestmark = pytest.mark.e2e  # runs the apps / launchers in subprocesses

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
    "extras.print_config=false",
    # a schedule whose value depends on the step and EMA weights: both must resume exactly too
    "module.scheduler.kind=poly",
    "module.ema_decay=0.9",
]
SIGNAL_AT = "+callbacks.signal._target_=proscale.lightning.interrupt.SignalAtStep"


def _command(log_dir: Path, data_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        *COMMON,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}


def _run(log_dir: Path, data_dir: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = _command(log_dir, data_dir, run_dir, *overrides)
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def _checkpoint(path: Path) -> dict:
    return torch_load(path)  # the safe loader: every checkpoint the project writes must load without unpickling


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = _checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ema = checkpoint.get("ema") or {}
    return {**checkpoint["state_dict"], **{f"ema.{k}": v for k, v in (ema.get("shadow") or {}).items()}}


def _assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(actual)
    assert any(name.startswith("ema.") for name in expected)  # EMA weights are compared too
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def _assert_complete_files(run_dir: Path, allow_temporaries: bool = False) -> None:
    """Every checkpoint loads, results.json (if any) parses, every CSV log row is whole. A process killed while
    writing may leave a ``.<name>.tmp-<pid>`` file (the next run in that folder removes it), never a partial file
    under a final name."""
    for checkpoint in run_dir.rglob("*.ckpt"):
        assert "global_step" in _checkpoint(checkpoint), checkpoint
    for results in run_dir.rglob("results.json"):
        json.loads(results.read_text())
    for log in run_dir.rglob("*.csv"):
        rows = list(csv.reader(log.read_text().splitlines()))
        assert all(len(row) == len(rows[0]) for row in rows), f"{log}: a row is cut"
    if not allow_temporaries:
        assert not [p for p in run_dir.rglob(".*.tmp-*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("resume")
    data_dir, log_dir = root / "data", root / "logs"
    run_dir = log_dir / "train" / "runs" / "tiny" / "a_uninterrupted"
    done = _run(log_dir, data_dir, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"data_dir": data_dir, "log_dir": log_dir, "runs": run_dir.parent, "weights": _weights(run_dir)}


# ~1 min on an idle 2-core machine (two training subprocesses); part of the default suite: it is the fault test
def test_sigkill_then_resume_matches_uninterrupted_run(reference):
    data_dir, log_dir, runs = reference["data_dir"], reference["log_dir"], reference["runs"]

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
    assert _checkpoint(killed / "checkpoints" / "last.ckpt")["global_step"] == 2  # end of epoch 0

    # `ckpt_path=last` picks the newest last.ckpt of this experiment: the killed run's (newer than a_uninterrupted).
    os.utime(killed / "checkpoints" / "last.ckpt")
    resumed = runs / "c_resumed"
    finish = _run(log_dir, data_dir, resumed, "ckpt_path=last")
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoints' / 'last.ckpt'}" in finish.stdout + finish.stderr
    _assert_complete_files(resumed)
    assert json.loads((resumed / "results.json").read_text())["status"] == "ok"
    assert _checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 6
    _assert_same_weights(reference["weights"], _weights(resumed))


def test_sigint_checkpoints_mid_epoch_records_interrupted_and_resumes_exactly(reference):
    """Ctrl+C at step 2 (mid epoch 1): the step finishes, last.ckpt is written at step 3, results.json says
    "interrupted", exit status 130, one message and no traceback; `ckpt_path=last` resumes inside the epoch
    (the loader skips the trained batches and restores the random state) and ends with the reference weights."""
    data_dir, log_dir, runs = reference["data_dir"], reference["log_dir"], reference["runs"]
    interrupted = runs / "d_sigint"
    stop = _run(log_dir, data_dir, interrupted, SIGNAL_AT, "+callbacks.signal.at_step=2")
    output = stop.stdout + stop.stderr
    assert stop.returncode == 130, output[-3000:]  # today: 1, "error": "SystemExit: 1", no checkpoint
    assert "Traceback" not in output and "interrupted by SIGINT after step 3" in output
    results = json.loads((interrupted / "results.json").read_text())
    last = interrupted / "checkpoints" / "last.ckpt"
    assert results["status"] == "interrupted" and results["signal"] == "SIGINT" and results["error"] is None
    assert results["checkpoint"] == str(last) and results["step"] == 3
    _assert_complete_files(interrupted)
    assert _checkpoint(last)["global_step"] == 3

    os.utime(last)  # the newest last.ckpt of the experiment
    resumed = runs / "e_sigint_resumed"
    finish = _run(log_dir, data_dir, resumed, "ckpt_path=last")
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert f"resuming from {last}" in finish.stdout + finish.stderr
    assert "not resumable" not in finish.stdout + finish.stderr  # Lightning's warning about mid-epoch checkpoints
    assert json.loads((resumed / "results.json").read_text())["status"] == "ok"
    _assert_same_weights(reference["weights"], _weights(resumed))


def test_sigterm_checkpoints_and_records_interrupted(reference, tmp_path):
    stop = _run(reference["log_dir"], reference["data_dir"], tmp_path / "run", SIGNAL_AT, "+callbacks.signal.at_step=1",
                "+callbacks.signal.signal_name=SIGTERM")  # fmt: skip
    assert stop.returncode == 143, (stop.stdout + stop.stderr)[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted" and results["signal"] == "SIGTERM" and results["step"] == 2
    assert _checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2


# last.ckpt every 3 steps (2 steps per epoch): at step 3, inside epoch 1, a mid-epoch checkpoint to resume from.
# (Not at an epoch's last step: a checkpoint written between an epoch's last step and its validation resumes with
# different random draws, see proscale/lightning/interrupt.py.)
EVERY_STEP = ["callbacks.last_checkpoint.every_n_epochs=null", "+callbacks.last_checkpoint.every_n_train_steps=3"]


def _kill_at_random_moment(command: list[str], log: Path, step: int, delay: float) -> subprocess.Popen:
    """Start ``command``, wait until it logs training step ``step``, then SIGKILL it ``delay`` s later."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while f"train: step {step}/" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    process.kill()
    process.wait()
    return process


@pytest.mark.slow  # ~3 min: 4 killed + 4 resumed runs
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sigkill_at_seeded_random_moments_then_resume_matches(reference, seed):
    """SIGKILL at a random moment (seeded; anywhere in the step, the checkpoint write or validation): every file
    left is complete or absent, and resuming from whatever last.ckpt survived ends with the reference weights."""
    data_dir, log_dir, runs = reference["data_dir"], reference["log_dir"], reference["runs"]
    rng = random.Random(seed)
    step, delay = rng.randint(1, 5), rng.uniform(0.0, 0.6)  # a step takes ~0.3-0.6 s here
    killed = runs / f"f_random_kill_{seed}"
    command = _command(log_dir, data_dir, killed, *EVERY_STEP)
    process = _kill_at_random_moment(command, killed.parent / f"f_random_kill_{seed}.log", step, delay)
    _assert_complete_files(killed, allow_temporaries=True)
    last = killed / "checkpoints" / "last.ckpt"
    if (killed / "results.json").exists():  # the run outran the killer
        assert json.loads((killed / "results.json").read_text())["status"] == "ok"
        return
    assert process.returncode == -signal.SIGKILL
    resumed = runs / f"g_random_resumed_{seed}"
    finish = _run(log_dir, data_dir, resumed, *EVERY_STEP, *([f"ckpt_path={last}"] if last.exists() else []))
    assert finish.returncode == 0, finish.stderr[-3000:]
    _assert_complete_files(resumed)
    _assert_same_weights(reference["weights"], _weights(resumed))
