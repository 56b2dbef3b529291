"""Evaluation: panoptic quality, COCO mask AP, semantic mIoU (torchmetrics ``Metric`` objects, DDP-safe), the
export of predictions in the official COCO formats, and offline scoring of such files.

- ``PanopticQualityEvaluator`` (``panoptic.py``, statistics in ``pq_stats.py``): PQ, SQ, RQ (+ ``_th``, ``_st``).
- ``InstanceAPEvaluator`` (``instance.py``, COCOeval in ``coco_ap.py``): AP, AP50, AP75, APs, APm, APl.
- ``SemanticSegEvaluator`` (``semantic.py``): mIoU, pAcc, mAcc, fwIoU.
- ``PanopticExporter`` / ``InstanceExporter`` (``export.py``): PNG + JSON / COCO results JSON, atomic writes.
- ``evaluate_panoptic_files`` / ``evaluate_instance_files`` (``coco_files.py``): what ``scripts/score_coco.py`` runs.

Every evaluator takes ``update(predictions, gts)`` with the inference output dicts and ``batch["gt"]`` of
``proscale.structures`` and returns ``dict[str, float]`` on the 0-100 scale from ``compute()``; after
``compute()`` its ``per_class`` attribute holds one dict per class (for W&B tables).
"""

from __future__ import annotations

import torch

from proscale.metrics.coco_files import evaluate_instance_files, evaluate_panoptic_files
from proscale.metrics.export import InstanceExporter, PanopticExporter
from proscale.metrics.instance import InstanceAPEvaluator
from proscale.metrics.panoptic import PanopticQualityEvaluator
from proscale.metrics.semantic import SemanticSegEvaluator
from proscale.structures import DatasetMeta

EVALUATORS = {
    "panoptic": PanopticQualityEvaluator,
    "instance": InstanceAPEvaluator,
    "semantic": SemanticSegEvaluator,
}


def build_evaluators(
    meta: DatasetMeta, tasks: tuple[str, ...] = ("panoptic", "instance", "semantic")
) -> torch.nn.ModuleDict:
    """One evaluator per task name (``panoptic`` / ``instance`` / ``semantic``), as a ModuleDict so that they
    follow the LightningModule's device."""
    unknown = [t for t in tasks if t not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {sorted(EVALUATORS)}")
    return torch.nn.ModuleDict({t: EVALUATORS[t](meta) for t in tasks})


__all__ = [
    "EVALUATORS",
    "InstanceAPEvaluator",
    "InstanceExporter",
    "PanopticExporter",
    "PanopticQualityEvaluator",
    "SemanticSegEvaluator",
    "build_evaluators",
    "evaluate_instance_files",
    "evaluate_panoptic_files",
]
