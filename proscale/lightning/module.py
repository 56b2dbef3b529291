"""LightningModule: Mask2Former (any encoder) + set criterion + inference + evaluators.

Logged names (``{stage}/{name}``):

- ``train/loss`` (weighted total), ``train/loss_ce``, ``train/loss_mask``, ``train/loss_dice`` (final prediction),
  ``train/nonfinite_skipped`` (steps skipped so far because the loss was NaN/inf);
- ``val/PQ``, ``val/SQ``, ``val/RQ``, ``val/PQ_th``, ``val/PQ_st``, ``val/AP``, ``val/AP50``, ... ``val/mIoU``,
  whatever scalar keys the evaluators return (0-100 scale), and the same under ``test/``;
- learning rates per parameter group via ``LearningRateMonitor`` (callbacks config).

Batch format: see :mod:`proscale.structures`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from proscale.lightning.ema import ModelEMA
from proscale.structures import DatasetMeta
from proscale.utils.logging_utils import get_logger
from proscale.utils.visualize import comparison_sample

log = get_logger(__name__)

# Per-class results are lists/dicts in the evaluator output; only numbers are logged as metrics.
_SCALAR_TYPES = (int, float)


def _build(obj: Any, **kwargs: Any) -> Any:
    """Finish a Hydra ``_partial_`` object with what is only known at run time (class count, metadata)."""
    if isinstance(obj, functools.partial):
        return obj(**kwargs)
    return obj


# The Mask2FormerInference settings a checkpoint stores (``hyper_parameters["inference"]``), so eval and predict
# score with the thresholds the run was scored with.
INFERENCE_SETTING_NAMES = (
    "object_mask_threshold",
    "overlap_threshold",
    "topk_per_image",
    "semantic_on",
    "instance_on",
    "panoptic_on",
)


def inference_settings(inference: Any) -> dict[str, Any] | None:
    """The stored settings of an inference module as plain Python values (None when it has none of them)."""
    settings = {}
    for name in INFERENCE_SETTING_NAMES:
        value = getattr(inference, name, None)
        if isinstance(value, bool):  # (bool before int: bool is an int)
            settings[name] = value
        elif isinstance(value, int):
            settings[name] = int(value)
        elif value is not None:
            settings[name] = float(value)
    return settings or None


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` NaN/inf losses in a row."""


class SegmentationModule(LightningModule):
    """Trains and evaluates a Mask2Former-style model.

    Args:
        model: ``nn.Module`` with ``model(images (B,3,H,W)) -> {"pred_logits", "pred_masks", "aux_outputs"}``.
        criterion: ``SetCriterion`` or a partial of it missing ``num_classes``.
        inference: ``Mask2FormerInference`` or a partial missing ``num_classes`` / ``thing_classes``.
        optimizer: ``callable(model) -> Optimizer`` (a Hydra partial of :func:`proscale.lightning.optim.build_adamw`).
        scheduler: ``callable(optimizer, total_steps) -> LRScheduler`` stepped every optimizer step, or ``None``.
        evaluators: ``{name: evaluator or partial missing meta}`` (:mod:`proscale.metrics`); each has ``reset()``,
            ``update(predictions, gts)``, ``compute() -> dict`` of scalars on the 0-100 scale, and optionally a
            ``per_class`` list of row dicts filled by ``compute()`` (the W&B per-class tables).
        meta: the dataset's class metadata (also stored in checkpoints so ``predict`` needs no dataset).
        model_config: the model's Hydra config as a plain dict, stored in checkpoints (``hyper_parameters``).
        test_transforms: the data module's test-time transforms as Hydra configs (plain dicts with ``_target_``),
            stored in checkpoints with the inference settings so eval / predict reproduce the run's scores.
        ema_decay: keep an exponential moving average of the weights and evaluate with it (``None`` = off).
        max_consecutive_nonfinite: NaN/inf losses are skipped (no optimizer step) and counted; this many in a
            row stop the run with :class:`NonFiniteLossError`.
        freeze_batchnorm: keep BatchNorm layers in eval mode while training (running statistics frozen, like
            the original's FrozenBN ResNet; also makes per-process results independent of the batch split).
        num_vis_samples: validation images kept (with ground truth and predictions) for the W&B images.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Callable[..., nn.Module],
        inference: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        evaluators: Mapping[str, Any] | None = None,
        meta: DatasetMeta | None = None,
        model_config: dict | None = None,
        test_transforms: list | None = None,
        ema_decay: float | None = None,
        max_consecutive_nonfinite: int = 20,
        freeze_batchnorm: bool = False,
        num_vis_samples: int = 4,
    ) -> None:
        super().__init__()
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")
        self.model = model
        self.meta = meta
        num_classes = meta.num_classes if meta is not None else getattr(model, "num_classes", None)
        thing_classes = meta.thing_classes if meta is not None else None
        self.criterion = _build(criterion, num_classes=num_classes)
        self.inference = _build(inference, num_classes=num_classes, thing_classes=thing_classes)
        # A ModuleDict so torchmetrics-based evaluators follow the module's device.
        self.evaluators = nn.ModuleDict({name: _build(ev, meta=meta) for name, ev in (evaluators or {}).items()})
        self._takes_image_ids = {
            name: "image_ids" in inspect.signature(ev.update).parameters for name, ev in self.evaluators.items()
        }
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema = ModelEMA(model, ema_decay) if ema_decay else None
        self._ema_raw_weights: dict[str, Tensor] | None = None
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.freeze_batchnorm = freeze_batchnorm
        self.num_vis_samples = num_vis_samples
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._drop_gradients = False
        # Filled by callbacks / epoch ends, read by callbacks and the train task.
        self.compute_stats: dict[str, float | None] = {}
        self.eval_details: dict[str, dict[str, Any]] = {}
        self.vis_samples: list[dict[str, Any]] = []
        self.save_hyperparameters(
            {
                "model_config": model_config,
                "inference": inference_settings(self.inference),
                "test_transforms": test_transforms,
                "meta": dataclasses.asdict(meta) if meta is not None else None,
                "ema_decay": ema_decay,
                "max_consecutive_nonfinite": max_consecutive_nonfinite,
                "freeze_batchnorm": freeze_batchnorm,
            },
            logger=False,
        )

    # ------------------------------------------------------------------ training
    def forward(self, images: Tensor) -> dict:
        return self.model(images)

    def train(self, mode: bool = True) -> SegmentationModule:
        super().train(mode)
        if mode and self.freeze_batchnorm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        images = batch["images"]
        outputs = self.model(images)
        losses = self.criterion(outputs, batch["targets"])
        loss = self.criterion.total_loss(losses)
        if self._skip_nonfinite(loss, losses):
            if self.trainer.world_size == 1:
                return None  # Lightning skips backward and the optimizer step
            # DDP needs every rank in the gradient all-reduce: back-propagate a zero that touches every
            # parameter (finite zero gradients), then drop the gradients so AdamW updates nothing.
            self._drop_gradients = True
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        batch_size = images.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for name in ("loss_ce", "loss_mask", "loss_dice"):
            if name in losses:
                self.log(f"train/{name}", losses[name].detach(), batch_size=batch_size)
        return loss

    def _skip_nonfinite(self, loss: Tensor, losses: dict[str, Tensor]) -> bool:
        """Decide (identically on every rank) whether to skip this step because some rank's loss is NaN/inf.

        The decision is all-reduced so every rank skips the same steps. One process: ``training_step`` returns
        ``None`` (no backward, no update). DDP (where Lightning forbids ``None``): a zero loss over every parameter
        keeps the gradient all-reduce in step and :meth:`on_before_optimizer_step` drops the gradients.
        """
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item() == 0:  # one host sync per step, outside the model's forward
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        culprits = sorted(k for k, v in losses.items() if not torch.isfinite(v.detach()).all())
        log.warning(
            f"step {self.global_step}: non-finite loss (keys {culprits[:6] or 'on another rank'}); skipped "
            f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in total)"
        )
        self.log("train/nonfinite_skipped", float(self.nonfinite_total), batch_size=1)
        if self.nonfinite_in_a_row >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"stopping: {self.nonfinite_in_a_row} consecutive non-finite losses (limit "
                f"module.max_consecutive_nonfinite={self.max_consecutive_nonfinite}) at step {self.global_step}; "
                f"non-finite keys: {culprits[:6]}. Try a lower learning rate, trainer.precision=32, or check the data."
            )
        return True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._drop_gradients:
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are skipped by AdamW
            self._drop_gradients = False

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the step, not in on_train_batch_end: callbacks' on_train_batch_end (a step checkpoint, an
        # interrupt's checkpoint) run before the module's, and must see the EMA of the weights they save.
        if self.ema is not None:
            self.ema.update(self.model)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def _start_eval(self, stage: str) -> None:
        for evaluator in self.evaluators.values():
            evaluator.reset()
        self.vis_samples = []
        if self.ema is not None and self._ema_raw_weights is None:
            self._ema_raw_weights = self.ema.swap_in(self.model)

    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs = self.model(batch["images"])
        predictions = self.inference(outputs, batch["image_sizes"], batch["orig_sizes"])
        for name, evaluator in self.evaluators.items():
            if self._takes_image_ids[name]:  # unique ids keep COCO AP correct when DDP splits the images
                evaluator.update(predictions, batch["gt"], image_ids=batch["image_ids"])
            else:
                evaluator.update(predictions, batch["gt"])
        if stage == "val" and len(self.vis_samples) < self.num_vis_samples:
            self._keep_vis_samples(batch, predictions)

    def _keep_vis_samples(self, batch: dict, predictions: list[dict]) -> None:
        isthing = list(self.meta.isthing) if self.meta is not None else None
        for index, prediction in enumerate(predictions):
            if len(self.vis_samples) >= self.num_vis_samples or "panoptic_seg" not in prediction:
                return
            self.vis_samples.append(comparison_sample(batch, index, prediction, isthing))

    def _end_eval(self, stage: str) -> None:
        scalars: dict[str, float] = {}
        details: dict[str, Any] = {}
        for name, evaluator in self.evaluators.items():
            for key, value in evaluator.compute().items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    value = float(value)
                if isinstance(value, _SCALAR_TYPES) and not isinstance(value, bool):
                    scalars[f"{stage}/{key}"] = float(value)
                else:
                    details[f"{name}/{key}"] = value
            if getattr(evaluator, "per_class", None):
                details[f"{name}/per_class"] = list(evaluator.per_class)
        self.eval_details[stage] = details
        if scalars:
            # Evaluators already gather across processes: every rank holds the same numbers.
            self.log_dict(scalars, sync_dist=False, batch_size=1)
        if self.ema is not None and self._ema_raw_weights is not None:
            self.ema.swap_out(self.model, self._ema_raw_weights)
            self._ema_raw_weights = None

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite"] = {"total": self.nonfinite_total, "in_a_row": self.nonfinite_in_a_row}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("nonfinite") or {}
        self.nonfinite_total = int(counters.get("total", 0))
        self.nonfinite_in_a_row = int(counters.get("in_a_row", 0))
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
