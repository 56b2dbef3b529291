"""Stopping a training run on SIGINT (Ctrl+C) or SIGTERM with a resumable checkpoint.

Lightning's own handling is not enough: on Ctrl+C it runs its exception hooks and calls ``sys.exit(1)``, mid-step,
without a checkpoint (the run was recorded as ``"error": "SystemExit: 1"``); on SIGTERM it sets
``trainer.received_sigterm`` and raises ``SIGTERMException`` after the current step, also without a checkpoint.

:class:`GracefulInterrupt` (added to every training run by :func:`proscale.tasks.run.build_trainer`) turns the first
Ctrl+C into a request, like SIGTERM; after the current training step (the epoch's last: after its validation) it
writes ``last.ckpt`` (atomically, through
the trainer's :class:`~proscale.lightning.callbacks.AtomicCheckpointIO`) and raises
:class:`~proscale.utils.task.TrainingInterrupted`, which ``results.json`` records as ``status: "interrupted"``;
``ckpt_path=last`` resumes from that step. A second Ctrl+C aborts at once (no checkpoint). SIGUSR1 and SLURM's
auto-requeue are left to Lightning: under SLURM with auto-requeue the SIGTERM checkpoint is Lightning's.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment

from proscale.utils.task import TrainingInterrupted

EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def _slurm_requeue(trainer: Trainer) -> bool:
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    return isinstance(environment, SLURMEnvironment) and bool(environment.auto_requeue)


class GracefulInterrupt(Callback):
    """Checkpoint and stop at the next step boundary after SIGINT/SIGTERM.

    Args:
        checkpoint_path: where the resumable checkpoint goes (the run's ``checkpoints/last.ckpt``, the file
            ``ckpt_path=last`` looks for).
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.requested: str | None = None
        self._previous_handler: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requested = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl+C: the user does not want to wait for the step to end
            self._restore()
            raise KeyboardInterrupt
        self.requested = "SIGINT"
        print(
            "\nSIGINT: saving a checkpoint after the current step, then stopping (Ctrl+C again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _requested(self, trainer: Trainer) -> str | None:
        return self.requested or ("SIGTERM" if trainer.received_sigterm else None)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._requested(trainer) is None:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last step: stop after the epoch's validation instead (on_train_epoch_end). A checkpoint
            # written between the last step and that validation resumes with different random draws (Lightning
            # runs the pending validation before the next epoch's seeding), one written after it exactly.
            return
        self._stop(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._requested(trainer) is not None:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        name = self._requested(trainer)
        assert name is not None
        checkpoint = None
        if not (name == "SIGTERM" and _slurm_requeue(trainer)):
            trainer.save_checkpoint(self.checkpoint_path)  # every rank calls it; rank 0 writes
            checkpoint = str(self.checkpoint_path)
        self._restore()
        raise TrainingInterrupted(name, EXIT_CODES[name], checkpoint, trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()


class SignalAtStep(Callback):
    """Test aid: the process sends itself ``signal_name`` (``SIGINT`` / ``SIGTERM``) once, when training reaches
    ``at_step``, as a user pressing Ctrl+C or a scheduler stopping the job would. Used by the interruption tests."""

    def __init__(self, at_step: int, signal_name: str = "SIGINT") -> None:
        self.at_step, self.signum, self.sent = int(at_step), signal.Signals[signal_name], False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.sent and trainer.global_step >= self.at_step:
            import os

            self.sent = True
            os.kill(os.getpid(), self.signum)
