"""Panoptic-quality statistics of one image, vectorized, and their reduction to PQ / SQ / RQ.

Definition (Kirillov et al., "Panoptic Segmentation", and the reference implementation
``panopticapi/evaluation.py``), per image:

- A ground-truth (GT) segment ``g`` and a predicted segment ``p`` of the same category match when
  ``IoU(g, p) > 0.5`` with ``IoU = |g ∩ p| / (|g| + |p| - |g ∩ p| - |p ∩ void|)`` (the predicted pixels that fall
  on GT void are not counted against the prediction). IoU > 0.5 makes matches unique, so no assignment step.
- Crowd GT segments are never matched and never false negatives (FN). Every other unmatched GT segment is an FN.
- An unmatched prediction is a false positive (FP) unless more than half of it lies on GT void plus GT crowd
  regions of its own category.
- Per class: ``PQ = sum IoU(TP) / (TP + FP/2 + FN/2)``, ``SQ = sum IoU(TP) / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``;
  the averages (all / things / stuff) are over the classes with ``TP + FP + FN > 0``.

Why our own code instead of ``torchmetrics.detection.PanopticQuality``: torchmetrics has no crowd regions,
merges all stuff segments of a category, also removes the *GT*-side pixels that are void in the prediction from
the union and drops FNs that are mostly unpredicted (so it differs from panopticapi whenever a prediction leaves
pixels void), takes (category, instance) pixel pairs rather than id maps + ``segments_info``, and loops in Python
over segment pairs (400-500x slower per 480x640 image, ``scripts/benchmark_eval.py``). Where the two
definitions coincide they agree to 1e-6 (``tests/test_metrics_panoptic.py``).

Differences from panopticapi, on inputs panopticapi would not see from COCO: the areas of GT segments are counted
in the id map (panopticapi reads them from the JSON, equal for consistent files); several crowd segments of one
category in one image all count as crowd (panopticapi keeps only the last one listed); a GT segment listed but
absent from the map stays an FN (as in panopticapi).

Implementation: the two id maps are turned into dense indices through a lookup table, one ``bincount`` of
``gt_index * num_pred + pred_index`` gives every intersection at once, and all matching is done on that small
(num_gt + 1, num_pred + 1) matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Ids of RGB-encoded panoptic PNGs are < 2**24; below this bound a dense lookup table maps ids to indices in one
# gather (searchsorted over the same maps is ~5x slower, torch.unique ~20x).
_LUT_MAX_ID = 1 << 24


@dataclass
class SegmentsTable:
    """The segments of one id map: ``ids`` (S,) int64 (no 0), ``categories`` (S,) int64 contiguous,
    ``iscrowd`` (S,) bool -- small NumPy arrays (per-segment logic is cheaper in NumPy than in torch ops)."""

    ids: np.ndarray
    categories: np.ndarray
    iscrowd: np.ndarray

    @classmethod
    def from_lists(cls, ids: list[int], categories: list[int], iscrowd: list[int] | None = None) -> SegmentsTable:
        n = len(ids)
        crowd = iscrowd if iscrowd is not None else [0] * n
        return cls(
            ids=np.asarray(ids, dtype=np.int64).reshape(n),
            categories=np.asarray(categories, dtype=np.int64).reshape(n),
            iscrowd=np.asarray(crowd, dtype=bool).reshape(n),
        )


class IdIndexer:
    """Maps segment ids of an id map to dense indices ``0 = void, 1..S = segments`` (reusable scratch table).

    Holds one int32 lookup table that grows to the largest id seen (at most 2**24 entries = 64 MiB, only for
    RGB-encoded ids); entries are reset after each call so the table can be reused without re-filling it.
    CPU maps are indexed with NumPy (on this project's CPUs its integer gather / multiply-add / bincount run
    4-10x faster than the same torch ops), maps on an accelerator with torch on that device.
    """

    def __init__(self) -> None:
        self._lut: np.ndarray | Tensor | None = None

    def __call__(self, id_map: Tensor | np.ndarray, segment_ids: np.ndarray, what: str) -> np.ndarray | Tensor:
        """``id_map`` (H, W) integers, ``segment_ids`` (S,) -> (H*W,) int index (NumPy for CPU input, else a
        tensor on the map's device); ValueError for ids of the map that are not listed."""
        if segment_ids.size and segment_ids.min() <= 0:
            raise ValueError(f"{what}: segment ids must be positive (0 is void), got {segment_ids.tolist()}")
        if np.unique(segment_ids).size != segment_ids.size:
            raise ValueError(f"{what}: duplicate segment ids in {segment_ids.tolist()}")
        on_host = not isinstance(id_map, Tensor) or id_map.device.type == "cpu"
        flat = (
            (id_map.numpy() if isinstance(id_map, Tensor) else np.asarray(id_map)).reshape(-1)
            if on_host
            else id_map.reshape(-1)
        )
        if on_host and flat.dtype.kind not in "iu":
            raise ValueError(f"{what}: id map must hold integers, got {flat.dtype}")
        if flat.size if on_host else flat.numel():
            lo, hi = (int(flat.min()), int(flat.max())) if on_host else (int(v) for v in torch.aminmax(flat))
        else:
            lo = hi = 0
        if lo < 0:
            raise ValueError(f"{what}: negative ids in the id map")
        bound = max(hi, int(segment_ids.max()) if segment_ids.size else 0) + 1
        if bound > _LUT_MAX_ID:
            return self._searchsorted(torch.as_tensor(flat), torch.from_numpy(segment_ids), what)
        if on_host:
            lut = self._table(bound, None)
            lut[segment_ids] = np.arange(1, segment_ids.size + 1, dtype=np.int32)
            lut[0] = 0
            index = lut[flat]
            lut[segment_ids] = -1
            lut[0] = -1
            bad = index < 0
            if bad.any():
                unknown = np.unique(flat[bad])[:10].tolist()
                raise ValueError(f"{what}: id map contains segment ids {unknown} that are not in its segments list")
            return index
        return self._index_torch(flat, segment_ids, bound, what)

    def _index_torch(self, flat: Tensor, segment_ids: np.ndarray, bound: int, what: str) -> Tensor:
        """The accelerator path (also runs on CPU tensors, which is how the tests cover it)."""
        ids = torch.from_numpy(segment_ids).to(flat.device)
        lut = self._table(bound, flat.device)
        lut[ids] = torch.arange(1, ids.numel() + 1, dtype=torch.int32, device=flat.device)
        lut[0] = 0
        index = lut.index_select(0, flat.long())
        lut[ids] = -1
        lut[0] = -1
        if bool((index < 0).any()):
            unknown = torch.unique(flat[index < 0])[:10].tolist()
            raise ValueError(f"{what}: id map contains segment ids {unknown} that are not in its segments list")
        return index.long()

    def _table(self, size: int, device: torch.device | None) -> np.ndarray | Tensor:
        on_host = device is None
        fits = self._lut is not None and len(self._lut) >= size
        same_kind = (
            isinstance(self._lut, np.ndarray)
            if on_host
            else isinstance(self._lut, Tensor) and self._lut.device == device
        )
        if not (fits and same_kind):
            capacity = min(_LUT_MAX_ID, 1 << max(size - 1, 1).bit_length())
            if on_host:
                self._lut = np.full(capacity, -1, dtype=np.int32)
            else:
                self._lut = torch.full((capacity,), -1, dtype=torch.int32, device=device)
        return self._lut

    @staticmethod
    def _searchsorted(flat: Tensor, segment_ids: Tensor, what: str) -> np.ndarray | Tensor:
        """Ids beyond the lookup table (only possible for in-memory maps): sorted search, ~5x slower."""
        known = torch.cat([segment_ids.new_zeros(1), segment_ids.to(flat.device)])
        known_sorted, order = torch.sort(known)
        pos = torch.searchsorted(known_sorted, flat.to(torch.int64)).clamp_(max=known.numel() - 1)
        bad = known_sorted[pos] != flat
        if bool(bad.any()):
            unknown = torch.unique(flat[bad])[:10].tolist()
            raise ValueError(f"{what}: id map contains segment ids {unknown} that are not in its segments list")
        index = order[pos]
        return index.numpy() if index.device.type == "cpu" else index


@dataclass
class PQStats:
    """Per-class accumulators (each (K,) NumPy): ``iou_sum`` float64, ``tp``, ``fp``, ``fn`` int64."""

    iou_sum: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> PQStats:
        z = np.zeros(num_classes, dtype=np.int64)
        return cls(np.zeros(num_classes, dtype=np.float64), z.copy(), z.copy(), z.copy())

    def __iadd__(self, other: PQStats) -> PQStats:
        self.iou_sum += other.iou_sum
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


def pq_image_stats(
    gt_map: Tensor,
    gt_segments: SegmentsTable,
    pred_map: Tensor,
    pred_segments: SegmentsTable,
    num_classes: int,
    indexer: IdIndexer | None = None,
    skip_empty_predictions: bool = True,
) -> PQStats:
    """PQ statistics of one image.

    Args:
        gt_map: (H, W) integer GT segment ids, 0 = void (tensor on any device, or NumPy array).
        gt_segments: the GT segments (every non-zero id of ``gt_map`` must be listed; crowd flags used).
        pred_map: (H, W) integer predicted segment ids, 0 = void (unassigned pixels).
        pred_segments: the predicted segments (every non-zero id of ``pred_map`` must be listed).
        num_classes: K, categories are contiguous in [0, K).
        indexer: a reusable ``IdIndexer`` (saves re-allocating its table per image).
        skip_empty_predictions: listed predictions with no pixel are ignored; if False they raise (panopticapi
            rejects them).

    Returns:
        ``PQStats`` with (K,) arrays. The pixel work (index + joint histogram) runs on the maps' device; only
        the (num_gt + 1, num_pred + 1) histogram comes back to the host.
    """
    if gt_map.shape != pred_map.shape:
        raise ValueError(f"GT id map {tuple(gt_map.shape)} and prediction {tuple(pred_map.shape)} differ in size")
    for name, seg in (("GT", gt_segments), ("prediction", pred_segments)):
        if seg.categories.size and (seg.categories.min() < 0 or seg.categories.max() >= num_classes):
            raise ValueError(f"{name} segments: category ids {seg.categories.tolist()} outside [0, {num_classes})")
    indexer = indexer or IdIndexer()
    if isinstance(gt_map, Tensor) and isinstance(pred_map, Tensor) and gt_map.device != pred_map.device:
        pred_map = pred_map.to(gt_map.device)
    gt_idx = indexer(gt_map, gt_segments.ids, "GT")
    pred_idx = indexer(pred_map, pred_segments.ids, "prediction")
    num_gt, num_pred = gt_segments.ids.size + 1, pred_segments.ids.size + 1
    if isinstance(gt_idx, np.ndarray):
        pair = gt_idx * np.int32(num_pred) if num_gt * num_pred < 2**31 else gt_idx.astype(np.int64) * num_pred
        pair += pred_idx
        joint = np.bincount(pair, minlength=num_gt * num_pred)
    else:
        joint = torch.bincount(gt_idx * num_pred + pred_idx, minlength=num_gt * num_pred).cpu().numpy()
    joint = joint.reshape(num_gt, num_pred).astype(np.float64)

    gt_cat, pred_cat, crowd = gt_segments.categories, pred_segments.categories, gt_segments.iscrowd
    gt_area = joint.sum(1)[1:]
    pred_area = joint.sum(0)[1:]
    pred_on_void = joint[0, 1:]
    inter = joint[1:, 1:]
    if not skip_empty_predictions and (pred_area == 0).any():
        missing = pred_segments.ids[pred_area == 0].tolist()
        raise ValueError(f"prediction segments {missing} are listed but have no pixel in the id map")

    same_cat = gt_cat[:, None] == pred_cat[None, :]
    union = gt_area[:, None] + pred_area[None, :] - inter - pred_on_void[None, :]
    iou = inter / np.maximum(union, 1.0)
    matched = (iou > 0.5) & same_cat & ~crowd[:, None]
    gt_i, pred_j = matched.nonzero()

    stats = PQStats.zeros(num_classes)
    stats.tp += np.bincount(gt_cat[gt_i], minlength=num_classes)
    stats.iou_sum += np.bincount(gt_cat[gt_i], weights=iou[gt_i, pred_j], minlength=num_classes)
    unmatched_gt = ~matched.any(1) & ~crowd
    stats.fn += np.bincount(gt_cat[unmatched_gt], minlength=num_classes)
    on_own_crowd = (inter * (same_cat & crowd[:, None])).sum(0)
    ignored = (pred_on_void + on_own_crowd) > 0.5 * pred_area
    false_pos = ~matched.any(0) & ~ignored & (pred_area > 0)
    stats.fp += np.bincount(pred_cat[false_pos], minlength=num_classes)
    return stats


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize_pq(
    stats: PQStats, isthing: list[bool], class_names: list[str] | None = None, category_ids: list[int] | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Reduce accumulated statistics to metrics on the 0-100 scale.

    Returns:
        ``(metrics, per_class)``: metrics keys ``PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st`` (NaN for a
        group without any counted class) and the counts ``num_classes_{all,th,st}``; ``per_class`` one dict per
        class with ``class_id, name, category_id, isthing, PQ, SQ, RQ, TP, FP, FN`` (PQ/SQ/RQ NaN when the class
        never occurred, i.e. TP + FP + FN = 0).
    """
    tp, fp, fn = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (stats.tp, stats.fp, stats.fn))
    iou = torch.as_tensor(np.asarray(stats.iou_sum), dtype=torch.float64)
    denom = tp + 0.5 * fp + 0.5 * fn
    counted = (tp + fp + fn) > 0
    pq = torch.where(counted, iou / denom.clamp(min=1e-12), torch.nan)
    sq = torch.where(counted, torch.where(tp > 0, iou / tp.clamp(min=1), 0.0), torch.nan)
    rq = torch.where(counted, tp / denom.clamp(min=1e-12), torch.nan)

    metrics: dict[str, float] = {}
    groups = {"": [True] * len(isthing), "_th": list(isthing), "_st": [not t for t in isthing]}
    for suffix, member in groups.items():
        classes = [k for k in range(len(isthing)) if member[k] and bool(counted[k])]
        for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            metrics[name + suffix] = 100.0 * _mean([float(values[k]) for k in classes])
        metrics["num_classes" + (suffix or "_all")] = float(len(classes))

    per_class = []
    for k, thing in enumerate(isthing):
        per_class.append(
            {
                "class_id": k,
                "name": class_names[k] if class_names else str(k),
                "category_id": category_ids[k] if category_ids else k,
                "isthing": bool(thing),
                "PQ": 100.0 * float(pq[k]),
                "SQ": 100.0 * float(sq[k]),
                "RQ": 100.0 * float(rq[k]),
                "TP": int(tp[k]),
                "FP": int(fp[k]),
                "FN": int(fn[k]),
            }
        )
    return metrics, per_class
