"""Shared by the launch tests (torchrun, elastic restarts, SLURM signals, submitit): subprocess commands of
``scripts/train.py`` with the tiny preset, a free TCP port, and file checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "scripts" / "train.py")

# Tiny, deterministic runs: no augmentation, no validation or test, 1 thread per process.
TINY = [
    "experiment=tiny",
    "num_threads=1",
    "trainer.enable_progress_bar=false",
    "callbacks.compute_stats.timing_runs=0",
    "data.train_transforms=[]",
]


def short_run(tmp: Path, num_train: int, steps: int) -> list[str]:
    """TINY in ``tmp`` (logs, data) with ``num_train`` training images, ``steps`` steps, no validation or test."""
    return [
        *TINY,
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.data_dir={tmp / 'data'}",
        f"data.num_train={num_train}",
        "data.num_val=2",
        f"steps={steps}",
        "test=false",
        "trainer.limit_val_batches=0",
    ]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child process: this checkout first on the path, one thread, offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in [os.environ.get("PYTHONPATH")] if p]])
    return env


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for ``process`` (killed after ``timeout`` s); returns (exit code, combined output)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return -999, output + "\n[test] killed after the timeout"
    return process.returncode, output


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str]:
    return finish(start(command, env), timeout)


def state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def global_step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])


def assert_complete_files(folder: Path) -> None:
    """Every checkpoint loads, every results.json parses, no temporary leftovers, no Lightning ``-v1`` copies."""
    for checkpoint in folder.rglob("*.ckpt"):
        torch.load(checkpoint, map_location="cpu", weights_only=False)
    for results in folder.rglob("results.json"):
        json.loads(results.read_text())
    assert not list(folder.rglob(".*.tmp-*"))
    assert not [p for p in folder.rglob("*.ckpt") if "-v" in p.stem], sorted(folder.rglob("*.ckpt"))


def assert_weights_close(actual: dict, expected: dict, atol: float) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
