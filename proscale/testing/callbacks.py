"""Test aids that run inside training processes started from the command line (torchrun, submitit, subprocess
tests), where a test module cannot inject code: add them with ``+callbacks.<name>._target_=...``.

- :class:`BatchInvariantRun`: oneDNN off and the criterion's random point draws fixed, so that a run on N
  processes with batch b computes the same numbers as one process with batch N*b (see ``tests/test_ddp.py``'s
  docstring for why each is needed); also saves the initial parameters, to show that the weights moved.
- :class:`RecordCheckpointWrites`: appends ``<rank> <path>`` to ``<out_dir>/checkpoint_writes_rank<r>.txt``
  for every checkpoint file a process writes.
- :class:`SendSignal`: the process sends itself a signal when training reaches a step (SLURM's pre-timeout
  ``SIGUSR1``, simulated).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

_REAL_RAND = torch.rand


def same_points_rand(*size: Any, generator=None, out=None, dtype=None, device=None, **kwargs: Any) -> torch.Tensor:
    """``torch.rand`` whose value depends only on the last two dims: identical points for every mask and image."""
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)
    base = _REAL_RAND(shape[-2:], generator=torch.Generator().manual_seed(1234))
    return base.expand(shape).clone().to(device=device, dtype=dtype or torch.float32)


class BatchInvariantRun(Callback):
    """While the run lasts: ``torch.rand`` draws the same points for every mask and image, oneDNN is off.
    At fit start rank 0 saves the initial parameters to ``<out_dir>/initial_weights.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self._mkldnn_was_enabled = torch.backends.mkldnn.enabled

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.rand = same_points_rand
        self._mkldnn_was_enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        torch.rand = _REAL_RAND
        torch.backends.mkldnn.enabled = self._mkldnn_was_enabled

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == 0 and trainer.global_step == 0:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(weights, Path(self.out_dir) / "initial_weights.pt")


class RecordCheckpointWrites(Callback):
    """Wraps the trainer's checkpoint IO so that each write is recorded per rank (which process wrote what)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        if getattr(checkpoint_io, "_recorded", False):
            return
        real_save, rank = checkpoint_io.save_checkpoint, trainer.global_rank
        record = Path(self.out_dir) / f"checkpoint_writes_rank{rank}.txt"
        record.parent.mkdir(parents=True, exist_ok=True)

        def save_checkpoint(checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            real_save(checkpoint, path, storage_options)
            with open(record, "a") as handle:
                handle.write(f"{rank} {path}\n")

        checkpoint_io.save_checkpoint = save_checkpoint
        checkpoint_io._recorded = True


class SendSignal(Callback):
    """Sends ``signal_name`` (e.g. ``SIGUSR1``) to this process once, when training reaches ``at_step``."""

    def __init__(self, at_step: int, signal_name: str = "SIGUSR1") -> None:
        self.at_step = int(at_step)
        self.signum = getattr(signal, signal_name)
        self.sent = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.sent and trainer.global_step >= self.at_step:
            self.sent = True
            os.kill(os.getpid(), self.signum)
