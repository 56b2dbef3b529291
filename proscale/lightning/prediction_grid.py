"""The picture a run ends with: validation images, their ground truth and the model's panoptic prediction.

:class:`PredictionGrid` writes ``<run>/predictions_val.png`` (``conf/callbacks/default.yaml``, key
``prediction_grid``; ``callbacks.prediction_grid=null`` turns it off): one row per image, image | ground truth
(class names) | prediction (class names + scores) | legend, drawn by :mod:`proscale.utils.visualize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from proscale.utils.io import atomic_write_png
from proscale.utils.logging_utils import get_logger
from proscale.utils.visualize import comparison_grid, comparison_sample

log = get_logger(__name__)


def predict_samples(pl_module: LightningModule, loader: Any, num_images: int) -> list[dict]:
    """Run ``pl_module.model`` + ``pl_module.inference`` (eval mode, no grad, the EMA weights when the module
    keeps them, as evaluation does) on the first ``num_images`` images of ``loader``.

    Returns:
        :func:`proscale.utils.visualize.comparison_sample` dicts; empty when the inference makes no panoptic output.
    """
    meta = getattr(pl_module, "meta", None)
    isthing = list(meta.isthing) if meta is not None else None
    ema = getattr(pl_module, "ema", None)
    was_training = pl_module.training
    raw = ema.swap_in(pl_module.model) if ema is not None else None
    pl_module.eval()
    samples: list[dict] = []
    try:
        with torch.no_grad():
            for batch in loader:
                outputs = pl_module.model(batch["images"].to(pl_module.device))
                predictions = pl_module.inference(outputs, batch["image_sizes"], batch["orig_sizes"])
                for index, prediction in enumerate(predictions):
                    if "panoptic_seg" not in prediction:
                        return []
                    samples.append(comparison_sample(batch, index, prediction, isthing))
                    if len(samples) >= num_images:
                        return samples
    finally:
        if raw is not None:
            ema.swap_out(pl_module.model, raw)
        pl_module.train(was_training)
    return samples


class PredictionGrid(Callback):
    """At the end of fit and again after test (the tested weights win), rank 0 draws ``num_images`` validation
    images with their ground truth and prediction into one PNG, written atomically at ``path``.

    Args:
        num_images: rows of the grid (the first images of the validation loader).
        path: the PNG to write (the configs put it in the run's output folder).
        min_side: panels are enlarged (nearest) to at least this many pixels on their short side, so the class
            names stay legible on small images.

    ``written`` holds the path once written (the train task prints it). Instance-only data (no panoptic ground
    truth or prediction) is skipped with a log line, and so is a run without a validation loader; a failure
    while drawing is logged and does not fail the run.
    """

    def __init__(self, num_images: int = 4, path: str = "predictions_val.png", min_side: int = 256) -> None:
        if num_images < 1:
            raise ValueError(f"PredictionGrid: num_images must be >= 1, got {num_images}")
        self.num_images, self.path, self.min_side = int(num_images), Path(path), int(min_side)
        self.written: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.draw(trainer, pl_module, "the weights at the end of training")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.draw(trainer, pl_module, "the tested weights")

    def draw(self, trainer: Trainer, pl_module: LightningModule, weights: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        if getattr(pl_module.inference, "panoptic_on", True) is False:
            log.info("prediction grid skipped: the inference makes no panoptic output (instance-only data)")
            return None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            log.info("prediction grid skipped: no validation data loader")
            return None
        try:
            samples = predict_samples(pl_module, datamodule.val_dataloader(), self.num_images)
            if not samples:
                log.info("prediction grid skipped: no panoptic prediction (instance-only data?)")
                return None
            if samples[0]["gt_segment_ids"] is None:
                log.info("prediction grid skipped: the validation data has no panoptic ground truth (instance-only)")
                return None
            meta = pl_module.meta
            names = list(meta.class_names) if meta is not None else []  # (unnamed classes show their index)
            grid = comparison_grid(samples, names, meta.colors if meta is not None else None, self.min_side)
            self.written = atomic_write_png(self.path, grid).resolve()
        except Exception as error:  # the picture must not cost the run its results
            log.warning(f"prediction grid not written: {type(error).__name__}: {error}")
            return None
        log.info(f"prediction grid ({len(samples)} validation images, {weights}): {self.written}")
        return self.written
