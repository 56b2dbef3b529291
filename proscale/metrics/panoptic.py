"""Panoptic quality evaluator for validation / test: PQ, SQ, RQ overall, things, stuff and per class.

Usage (inside a LightningModule; ``gts = batch["gt"]``, ``predictions`` from ``Mask2FormerInference``)::

    evaluator = PanopticQualityEvaluator(meta)
    evaluator.update(predictions, gts)      # every validation step
    metrics = evaluator.compute()           # {"PQ": .., "SQ": .., "RQ": .., "PQ_th": .., ...} on the 0-100 scale
    table = evaluator.per_class             # list of dicts (W&B table rows), filled by compute()
    evaluator.reset()

DDP: the state is four (K,) per-class sums (``iou_sum``, ``tp``, ``fp``, ``fn``) that torchmetrics all-reduces
before ``compute``, so every rank returns the metrics of the whole split. Definition and the reason it is not
``torchmetrics.detection.PanopticQuality``: ``proscale.metrics.pq_stats``.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from proscale.metrics.pq_stats import IdIndexer, PQStats, SegmentsTable, pq_image_stats, summarize_pq
from proscale.structures import DatasetMeta


def gt_segments_table(gt: dict, num_classes: int) -> SegmentsTable:
    """``gt["segments"]`` (list of {"id", "category", "iscrowd", ...}) -> ``SegmentsTable``."""
    try:
        segments = gt["segments"]
        return SegmentsTable.from_lists(
            [int(s["id"]) for s in segments],
            [int(s["category"]) for s in segments],
            [int(s.get("iscrowd", 0)) for s in segments],
        )
    except KeyError as err:
        raise ValueError(f"ground truth dict needs 'segments' with 'id' and 'category' keys, missing {err}") from None


def pred_segments_table(segments_info: list[dict]) -> SegmentsTable:
    """Inference ``segments_info`` (list of {"id", "category_id" (contiguous), ...}) -> ``SegmentsTable``."""
    try:
        return SegmentsTable.from_lists(
            [int(s["id"]) for s in segments_info], [int(s["category_id"]) for s in segments_info]
        )
    except KeyError as err:
        raise ValueError(f"panoptic segments_info entries need 'id' and 'category_id', missing {err}") from None


class PanopticQualityEvaluator(Metric):
    """PQ / SQ / RQ accumulated over images; ``compute()`` -> dict of floats (0-100), ``per_class`` rows."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, meta: DatasetMeta, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meta = meta
        k = meta.num_classes
        self.add_state("iou_sum", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tp", torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("fp", torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("fn", torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")
        self._indexer = IdIndexer()
        self.per_class: list[dict] = []
        self.num_classes_counted: dict[str, int] = {}

    def update(self, predictions: list[dict], gts: list[dict]) -> None:
        """Add a batch: ``predictions[i]["panoptic_seg"] = (id map (h0, w0), segments_info)``,
        ``gts[i] = {"panoptic": (h0, w0) ids, "segments": [...]}`` (formats in ``proscale.structures``)."""
        if len(predictions) != len(gts):
            raise ValueError(f"got {len(predictions)} predictions for {len(gts)} ground-truth images")
        k = self.meta.num_classes
        for pred, gt in zip(predictions, gts):
            if "panoptic_seg" not in pred:
                raise ValueError(f"prediction has no 'panoptic_seg' (keys: {sorted(pred)})")
            pred_map, segments_info = pred["panoptic_seg"]
            gt_map = gt["panoptic"].to(pred_map.device)
            stats = pq_image_stats(
                gt_map, gt_segments_table(gt, k), pred_map, pred_segments_table(segments_info), k, self._indexer
            )
            self.iou_sum += torch.from_numpy(stats.iou_sum).to(self.iou_sum.device)
            self.tp += torch.from_numpy(stats.tp).to(self.tp.device)
            self.fp += torch.from_numpy(stats.fp).to(self.fp.device)
            self.fn += torch.from_numpy(stats.fn).to(self.fn.device)

    def compute(self) -> dict[str, float]:
        """PQ, SQ, RQ and their ``_th`` / ``_st`` versions (0-100, NaN for a group without any counted class);
        also fills ``per_class`` and ``num_classes_counted`` ({"all", "th", "st"}: classes in each average)."""
        stats = PQStats(*(t.cpu().numpy() for t in (self.iou_sum, self.tp, self.fp, self.fn)))
        metrics, self.per_class = summarize_pq(stats, self.meta.isthing, self.meta.class_names, self.meta.category_ids)
        self.num_classes_counted = {g: int(metrics.pop(f"num_classes_{g}")) for g in ("all", "th", "st")}
        return metrics
