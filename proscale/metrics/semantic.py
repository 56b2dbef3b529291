"""Semantic segmentation evaluator: mIoU, pixel accuracy, mean accuracy, frequency-weighted IoU, per-class IoU.

The per-batch confusion matrix comes from torchmetrics (``multiclass_confusion_matrix`` with ``ignore_index``)
and is summed in a torchmetrics state (all-reduced under DDP). The reduction to mIoU is ours, because
torchmetrics' ``MulticlassJaccardIndex(average="macro")`` averages over every class with a non-empty union,
so a class that is predicted but absent from the ground truth enters the mean with IoU 0; the convention of
Mask2Former / detectron2's ``SemSegEvaluator`` (the published numbers) averages over the classes present in the
ground truth only (identical whenever every class occurs in the split, as on COCO / ADE20K / Cityscapes val).

Usage: ``update(predictions, gts)`` with ``predictions[i]["sem_seg"]`` (K, h0, w0) scores (argmax taken) and
``gts[i]["sem_seg"]`` (h0, w0) with ``meta.ignore_label`` for void; ``compute()`` -> ``{"mIoU", "pAcc", "mAcc",
"fwIoU"}`` on the 0-100 scale; ``per_class`` -> ``[{"class_id", "name", "IoU", "Acc"}]`` (NaN when the class is
absent from the ground truth).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix

from proscale.structures import DatasetMeta


def confusion_to_metrics(confmat: torch.Tensor, class_names: list[str]) -> tuple[dict[str, float], list[dict]]:
    """(K, K) confusion matrix (rows = GT, columns = prediction, ignored pixels excluded) -> metrics, per class."""
    cm = confmat.double().cpu()
    tp = cm.diagonal()
    pos_gt = cm.sum(1)
    pos_pred = cm.sum(0)
    union = pos_gt + pos_pred - tp
    present = pos_gt > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(present, tp / pos_gt.clamp(min=1), torch.nan)
    total = float(pos_gt.sum())
    n_present = int(present.sum())
    metrics = {
        "mIoU": 100.0 * float(iou[present].mean()) if n_present else math.nan,
        "mAcc": 100.0 * float(acc[present].mean()) if n_present else math.nan,
        "pAcc": 100.0 * float(tp.sum()) / total if total else math.nan,
        "fwIoU": 100.0 * float((pos_gt[present] / total * iou[present]).sum()) if total else math.nan,
    }
    per_class = [
        {"class_id": k, "name": name, "IoU": 100.0 * float(iou[k]), "Acc": 100.0 * float(acc[k])}
        for k, name in enumerate(class_names)
    ]
    return metrics, per_class


class SemanticSegEvaluator(Metric):
    """mIoU / pixel accuracy accumulated over images; ``compute()`` -> dict of floats (0-100)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, meta: DatasetMeta, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meta = meta
        k = meta.num_classes
        self.add_state("confmat", torch.zeros(k, k, dtype=torch.int64), dist_reduce_fx="sum")
        self.per_class: list[dict] = []

    def update(self, predictions: list[dict], gts: list[dict]) -> None:
        if len(predictions) != len(gts):
            raise ValueError(f"got {len(predictions)} predictions for {len(gts)} ground-truth images")
        k, ignore = self.meta.num_classes, self.meta.ignore_label
        for pred, gt in zip(predictions, gts):
            if "sem_seg" not in pred or "sem_seg" not in gt:
                raise ValueError("semantic evaluation needs 'sem_seg' in both the prediction and the ground truth")
            scores, target = pred["sem_seg"], gt["sem_seg"].to(pred["sem_seg"].device).long()
            if scores.dim() != 3 or scores.shape[0] != k or scores.shape[1:] != target.shape:
                raise ValueError(
                    f"sem_seg prediction {tuple(scores.shape)} does not fit K={k} and GT size {tuple(target.shape)}"
                )
            labelled = target[target != ignore]
            if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= k):
                bad = torch.unique(labelled[(labelled < 0) | (labelled >= k)])[:10].tolist()
                raise ValueError(f"GT sem_seg has labels {bad} outside [0, {k}) that are not ignore={ignore}")
            cm = multiclass_confusion_matrix(
                scores.argmax(0).flatten(), target.flatten(), k, ignore_index=ignore, validate_args=False
            )
            self.confmat += cm.to(self.confmat)

    def compute(self) -> dict[str, float]:
        metrics, self.per_class = confusion_to_metrics(self.confmat, self.meta.class_names)
        return metrics
