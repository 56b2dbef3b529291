"""Callbacks and the checkpoint-IO plugin of the training framework.

- :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file and renamed (never half-written).
- :class:`ComputeStats`: parameters, encoder/total GFLOPs (:mod:`proscale.analysis.flops`) and measured ms/img,
  computed once per run and logged as ``compute/*``.
- :class:`EpochSeeding`: reseeds every random generator at each epoch start from ``(seed, epoch)`` so a run
  resumed from an end-of-epoch checkpoint replays exactly what an uninterrupted run does.
- :class:`ProgressLog`: plain log lines of the training progress (step, loss, speed, ETA) and of each validation,
  for logs that are not a terminal (SLURM output files, ``| tee``), where the rich progress bar shows nothing.
- :class:`LayerSummary`: Lightning's rich table of the model's layers and parameter counts, without the FLOPs
  column and total that Lightning fills with zeros (our GFLOPs are :class:`ComputeStats`'s).
- :class:`WandbExtras`: W&B run summary (config, GFLOPs, params), validation images (ground truth beside the
  prediction, class names, scores, legend), per-class PQ table,
  and the run id stored in checkpoints so a resumed training continues the same W&B run.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.loggers import WandbLogger

from proscale.utils.io import atomic_torch_save
from proscale.utils.logging_utils import get_logger
from proscale.utils.safe_load import torch_load
from proscale.utils.visualize import comparison_row

log = get_logger(__name__)

WANDB_RUN_ID_KEY = "wandb_run_id"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` in the same folder, fsync, then ``os.replace`` onto the target.

    Loads (``trainer.fit/test(ckpt_path=...)``) go through :func:`proscale.utils.safe_load.torch_load`: a checkpoint
    that needs arbitrary unpickling is refused unless ``allow_unsafe`` (``allow_unsafe_load=true``).
    """

    def __init__(self, allow_unsafe: bool = False) -> None:
        super().__init__()
        self.allow_unsafe = allow_unsafe

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning's default maps every storage to the CPU; the strategy moves the states where they belong
        return torch_load(path, allow_unsafe=self.allow_unsafe, map_location=map_location or "cpu")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)


def _time_forward(
    pl_module: LightningModule, image_size: tuple[int, int], orig_size: tuple[int, int], runs: int
) -> float:
    """Median ms for one image through model + inference (eval mode, no grad) after one warm-up pass."""
    device = pl_module.device
    images = torch.randn(1, 3, *image_size, device=device)
    was_training = pl_module.training
    pl_module.eval()
    timings = []
    try:
        with torch.no_grad():
            for run in range(runs + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                outputs = pl_module.model(images)
                pl_module.inference(outputs, [image_size], [orig_size])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if run > 0:  # the first pass pays for allocations and lazy initialisation
                    timings.append((time.perf_counter() - start) * 1000.0)
    finally:
        pl_module.train(was_training)
    return statistics.median(timings)


class ComputeStats(Callback):
    """Params, encoder/total GFLOPs and ms/img of the run's model, measured once (at fit or test start).

    Args:
        image_size: padded network input (H, W) for GFLOPs and timing; ``None`` = the paper's COCO protocol.
        orig_size: original image size the inference resizes to.
        timing_runs: timed passes (median reported); 0 disables timing.

    Results go to ``pl_module.compute_stats`` (``params``, ``encoder_gflops``, ``total_gflops``, ``ms_per_img``)
    and to the loggers as ``compute/*`` at step 0.
    """

    def __init__(
        self,
        image_size: tuple[int, int] | None = (800, 1088),
        orig_size: tuple[int, int] = (480, 640),
        timing_runs: int = 5,
    ) -> None:
        self.image_size = tuple(image_size) if image_size is not None else None
        self.orig_size = tuple(orig_size)
        self.timing_runs = timing_runs

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._measure(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.compute_stats:
            self._measure(trainer, pl_module)

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stats: dict[str, float | None] = {"params": float(sum(p.numel() for p in pl_module.model.parameters()))}
        try:
            from proscale.analysis.flops import count_flops

            flops = count_flops(pl_module.model, image_size=self.image_size, orig_size=self.orig_size)
            stats["encoder_gflops"] = flops["encoder"]
            stats["total_gflops"] = flops["total"]
        except Exception as error:  # the run itself must not fail because of the analysis
            log.warning(f"GFLOPs not counted: {type(error).__name__}: {error}")
            stats["encoder_gflops"] = stats["total_gflops"] = None
        stats["ms_per_img"] = None
        if self.timing_runs > 0:
            size = self.image_size or (800, 1088)
            stats["ms_per_img"] = _time_forward(pl_module, size, self.orig_size, self.timing_runs)
        pl_module.compute_stats = stats
        numbers = {f"compute/{k}": v for k, v in stats.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=0)
        log.info("compute: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))


class LayerSummary(RichModelSummary):
    """The layer table of :class:`~lightning.pytorch.callbacks.RichModelSummary` (name, type, params, mode, and
    in/out sizes when known) and the parameter totals, without a FLOPs column: Lightning counts FLOPs only for a
    module with ``example_input_array`` and prints 0 for ours. The run's GFLOPs (fvcore convention, per part, at
    the configured image size) come from :class:`ComputeStats` (the ``compute:`` line, ``results.json``)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name in ("Params", "In sizes", "Out sizes") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*(str(cell) for cell in row))
        console = get_console()
        console.print(table)

        def count(n: float) -> str:
            return get_human_readable_count(int(n)).strip()

        console.print(
            f"[bold]Params[/]: {count(total_parameters)} ({count(trainable_parameters)} trainable, "
            f"{count(total_parameters - trainable_parameters)} frozen), {model_size:,.1f} MB\n"
            f"[bold]Modules[/]: {total_training_modes['train']} in train mode, {total_training_modes['eval']} in eval mode"
        )


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU + CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSeeding(Callback):
    """Make every epoch's randomness a function of ``(seed, epoch)`` alone.

    Data order (the sampler draws from torch's global generator when its epoch starts), augmentation and the
    criterion's random points all depend on the global generators. Reseeding at each epoch start, and right
    after a checkpoint is restored, gives a resumed run the state an uninterrupted run had at that epoch, so
    their weights agree to float precision (exactly, on CPU with ``num_workers=0``).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def _epoch_seed(self, epoch: int) -> int:
        return self.seed * 100_003 + epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seed_all(self._epoch_seed(trainer.current_epoch))

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning builds the data iterator of the resumed epoch before on_train_epoch_start fires.
        seed_all(self._epoch_seed(int(checkpoint.get("epoch", 0)) + 1))


def _format_duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLog(Callback):
    """Log a line every ``every_n_steps`` optimizer steps (default: every ``fraction`` of the run) with the step,
    epoch, training loss, speed and remaining time, and one line per validation with its main metrics.

    Args:
        every_n_steps: interval in steps; ``None`` = ``fraction`` x the run's total steps (at least 1).
        fraction: see ``every_n_steps``.
        only_without_tty: stay quiet when stdout is a terminal (the rich progress bar shows the same there).
        metrics: validation metrics to report, when logged.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        fraction: float = 0.05,
        only_without_tty: bool = True,
        metrics: tuple[str, ...] = ("val/PQ", "val/AP", "val/mIoU"),
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ProgressLog: every_n_steps must be >= 1 or null, got {every_n_steps}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"ProgressLog: fraction must be in (0, 1], got {fraction}")
        self.every_n_steps, self.fraction = every_n_steps, fraction
        self.only_without_tty, self.metrics = only_without_tty, tuple(metrics)
        self.active = False
        self.interval = self.total = self.first_step = self.last_logged = 0
        self.started = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.active = trainer.is_global_zero and not (self.only_without_tty and sys.stdout.isatty())
        try:  # max_steps, or fewer where max_epochs ends the run first; inf when neither bounds it
            estimate = float(trainer.estimated_stepping_batches)
        except Exception:  # e.g. an iterable dataset without a length: report steps without a total
            estimate = 0.0
        self.total = int(estimate) if math.isfinite(estimate) and estimate > 0 else 0
        if self.every_n_steps:
            self.interval = self.every_n_steps
        else:  # without a known total: every 50 steps
            self.interval = max(1, round(self.total * self.fraction)) if self.total else 50
        self.first_step = self.last_logged = trainer.global_step
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        due = step % self.interval == 0 or step == self.total
        if not self.active or step == self.last_logged or not due:  # (accumulated batches share a step)
            return
        self.last_logged = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f", loss {float(loss):.3f}" if isinstance(loss, torch.Tensor) else ""
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / max(elapsed, 1e-9)
        total = f"/{self.total} ({100 * step / self.total:.0f} %)" if self.total else ""
        remaining = f", ETA {_format_duration((self.total - step) / rate)}" if self.total and rate > 0 else ""
        log.info(
            f"train: step {step}{total}, epoch {trainer.current_epoch}{loss_text}, {rate:.2f} steps/s, "
            f"elapsed {_format_duration(elapsed)}{remaining}"
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active or trainer.sanity_checking:
            return
        values = {k: trainer.callback_metrics[k] for k in self.metrics if k in trainer.callback_metrics}
        if values:
            text = ", ".join(f"{k} {float(v):.2f}" for k, v in values.items())
            log.info(f"validation at step {trainer.global_step}: {text}")


def _wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class WandbExtras(Callback):
    """Everything W&B-specific beyond scalar metrics; a no-op when no ``WandbLogger`` is configured.

    Args:
        num_images: validation images logged per validation epoch (image | ground truth | prediction + legend).
        summary: extra key/values for the run summary (e.g. the resolved config from the train task).
        min_side: the logged panels are enlarged (nearest) to at least this short side, so names stay legible.
    """

    def __init__(self, num_images: int = 4, summary: dict[str, Any] | None = None, min_side: int = 256) -> None:
        self.num_images, self.min_side = num_images, min_side
        self.summary = dict(summary or {})

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_summary(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_summary(trainer, pl_module)

    def _write_summary(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        for logger in _wandb_loggers(trainer):
            run = logger.experiment
            for key, value in {**self.summary, **getattr(pl_module, "compute_stats", {})}.items():
                if value is not None:
                    run.summary[key] = value

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        loggers = _wandb_loggers(trainer)
        if loggers and trainer.global_rank == 0:
            checkpoint[WANDB_RUN_ID_KEY] = loggers[0].experiment.id

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers or trainer.global_rank != 0 or trainer.sanity_checking:
            return
        meta = getattr(pl_module, "meta", None)
        self.log_validation_images(loggers, pl_module.vis_samples[: self.num_images], meta, trainer.global_step)
        table = self._per_class_table(pl_module, meta)
        if table is not None:
            for logger in loggers:
                logger.experiment.log({"val/per_class_PQ": table, "trainer/global_step": trainer.global_step})

    def log_validation_images(self, loggers: list, samples: list[dict], meta: Any, step: int) -> None:
        """One image per validation sample through each logger's ``log_image`` (key ``val/predictions``): image |
        ground truth | prediction with class names, scores and a legend, enlarged to ``min_side`` px
        (:func:`proscale.utils.visualize.comparison_row`), captioned with the file name."""
        if not samples:
            return
        names = list(meta.class_names) if meta is not None else []  # (unnamed classes show their index)
        colors = meta.colors if meta is not None else None
        rows = [comparison_row(sample, names, colors, self.min_side) for sample in samples]
        captions = [str(sample["file_name"]) for sample in samples]
        for logger in loggers:
            logger.log_image(key="val/predictions", images=rows, step=step, caption=captions)

    @staticmethod
    def _per_class_table(pl_module: LightningModule, meta: Any) -> Any:
        """The panoptic evaluator's per-class rows (dicts) as a ``wandb.Table`` (None when there are none)."""
        import wandb

        details = pl_module.eval_details.get("val", {})
        rows = details.get("panoptic/per_class") or next(
            (v for k, v in details.items() if k.endswith("per_class") and v), None
        )
        if not rows or not isinstance(rows[0], dict):
            return None
        columns = list(rows[0])
        return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


class FaultInjection(Callback):
    """Test aid: the process kills itself with SIGKILL when training reaches ``kill_at_step`` (no clean-up, no
    final writes), as a preempted or OOM-killed job would die. Used by the resume tests. ``rank``: only this
    global rank dies (None = every rank); ``attempt``: only in this torchrun attempt (``TORCHELASTIC_RESTART_COUNT``;
    None = every attempt), so that a restarted group runs through."""

    def __init__(self, kill_at_step: int, rank: int | None = None, attempt: int | None = None) -> None:
        self.kill_at_step = int(kill_at_step)
        self.rank, self.attempt = rank, attempt

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        from proscale.utils.launch import restart_count

        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if self.attempt is not None and restart_count() != self.attempt:
            return
        if trainer.global_step >= self.kill_at_step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
