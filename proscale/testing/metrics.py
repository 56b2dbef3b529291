"""Random panoptic ground truth and imperfect predictions in the formats of ``proscale.structures``, for the
metric tests and ``scripts/benchmark_eval.py`` (not for training: see ``proscale.data`` for the dataset).

An image is a few horizontal stuff bands, void rectangles, then thing rectangles painted in order (later ones
occlude earlier ones, so segments are not rectangles). The prediction repaints the same layout with jittered
band borders, shifted / dropped / relabelled things and a few spurious segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proscale.metrics.pq_stats import IdIndexer
from proscale.structures import DatasetMeta

_INDEXER = IdIndexer()  # one lookup table for all generated images (64 MiB with RGB-range ids)


@dataclass
class PairConfig:
    """Knobs of ``random_pair``; the defaults exercise crowd, void and large RGB-style ids."""

    max_things: int = 8
    crowd_prob: float = 0.1
    gt_void_rects: int = 2
    pred_void_rects: int = 1
    distinct_stuff: bool = False  # at most one segment per stuff category (as torchmetrics assumes)
    large_ids: bool = True  # GT ids drawn from [1, 2**24) like COCO's RGB-encoded ids
    with_instances: bool = True
    with_sem_seg: bool = True


def _rand(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def _rect(g: torch.Generator, h: int, w: int, min_frac: float = 0.05, max_frac: float = 0.5) -> tuple[int, ...]:
    rh = max(1, int(h * (min_frac + (max_frac - min_frac) * float(torch.rand(1, generator=g)))))
    rw = max(1, int(w * (min_frac + (max_frac - min_frac) * float(torch.rand(1, generator=g)))))
    y, x = _rand(g, 0, h - rh + 1), _rand(g, 0, w - rw + 1)
    return y, x, rh, rw


def _bands(g: torch.Generator, h: int, n: int) -> list[int]:
    cuts = sorted(torch.randperm(h - 1, generator=g)[: n - 1].add(1).tolist())
    return [0, *cuts, h]


def random_pair(
    meta: DatasetMeta, h: int, w: int, g: torch.Generator, cfg: PairConfig | None = None
) -> tuple[dict, dict]:
    """One (prediction, gt) pair: ``gt`` = {"panoptic", "segments", "sem_seg"}, ``prediction`` =
    {"panoptic_seg", "instances"?, "sem_seg"?} (``proscale.structures`` formats, contiguous categories)."""
    cfg = cfg or PairConfig()
    things, stuffs = meta.thing_classes, [k for k in range(meta.num_classes) if not meta.isthing[k]]
    gt_map = torch.zeros(h, w, dtype=torch.int64)
    pred_map = torch.zeros(h, w, dtype=torch.int64)
    gt_info: dict[int, dict] = {}
    pred_info: dict[int, dict] = {}
    next_pred_id = 1

    def new_gt_id() -> int:
        while True:
            sid = _rand(g, 1, 1 << 24) if cfg.large_ids else len(gt_info) + 1
            if sid not in gt_info:
                return sid

    # stuff bands (pred borders jittered); with distinct_stuff each stuff class appears once per image
    if stuffs:
        n = min(_rand(g, 1, 4), h, len(stuffs) if cfg.distinct_stuff else 3)
        order = torch.randperm(len(stuffs), generator=g).tolist()
        cats = [
            stuffs[order[i % len(order)]] if cfg.distinct_stuff else stuffs[_rand(g, 0, len(stuffs))] for i in range(n)
        ]
        borders = _bands(g, h, n)
        pred_borders = [
            borders[0],
            *[min(h - 1, max(1, b + _rand(g, -h // 10, h // 10 + 1))) for b in borders[1:-1]],
            h,
        ]
        pred_borders = [pred_borders[0], *sorted(pred_borders[1:-1]), h]
        pred_stuff_id: dict[int, int] = {}
        for i, cat in enumerate(cats):
            sid = new_gt_id()
            gt_info[sid] = {"id": sid, "category": cat, "iscrowd": 0}
            gt_map[borders[i] : borders[i + 1]] = sid
            if cat not in pred_stuff_id or not cfg.distinct_stuff:
                pred_stuff_id[cat] = next_pred_id
                pred_info[next_pred_id] = {"id": next_pred_id, "category_id": cat, "isthing": False}
                next_pred_id += 1
            pred_map[pred_borders[i] : pred_borders[i + 1]] = pred_stuff_id[cat]
    for _ in range(cfg.gt_void_rects):
        y, x, rh, rw = _rect(g, h, w, 0.02, 0.2)
        gt_map[y : y + rh, x : x + rw] = 0

    # things: GT rectangle, and a prediction that is shifted, dropped or relabelled
    for _ in range(_rand(g, 0, cfg.max_things + 1) if things else 0):
        y, x, rh, rw = _rect(g, h, w, 0.03, 0.45)
        cat = things[_rand(g, 0, len(things))]
        sid = new_gt_id()
        crowd = int(float(torch.rand(1, generator=g)) < cfg.crowd_prob)
        gt_info[sid] = {"id": sid, "category": cat, "iscrowd": crowd}
        gt_map[y : y + rh, x : x + rw] = sid
        fate = float(torch.rand(1, generator=g))
        if fate < 0.15:
            continue  # missed
        pcat = things[_rand(g, 0, len(things))] if fate < 0.25 else cat
        dy, dx = _rand(g, -rh // 3, rh // 3 + 1), _rand(g, -rw // 3, rw // 3 + 1)
        py, px = min(max(0, y + dy), h - 1), min(max(0, x + dx), w - 1)
        pred_info[next_pred_id] = {"id": next_pred_id, "category_id": pcat, "isthing": True}
        pred_map[py : py + rh, px : px + rw] = next_pred_id
        next_pred_id += 1
    for _ in range(_rand(g, 0, 3) if things else 0):  # spurious predictions
        y, x, rh, rw = _rect(g, h, w, 0.03, 0.2)
        pred_info[next_pred_id] = {"id": next_pred_id, "category_id": things[_rand(g, 0, len(things))], "isthing": True}
        pred_map[y : y + rh, x : x + rw] = next_pred_id
        next_pred_id += 1
    for _ in range(cfg.pred_void_rects):
        y, x, rh, rw = _rect(g, h, w, 0.02, 0.15)
        pred_map[y : y + rh, x : x + rw] = 0

    indexer = _INDEXER
    gt_list, pred_list = list(gt_info.values()), list(pred_info.values())
    gt_index = indexer(gt_map, np.asarray([s["id"] for s in gt_list], dtype=np.int64), "GT")
    gt_areas = np.bincount(gt_index, minlength=len(gt_list) + 1).tolist()
    pred_index = indexer(pred_map, np.asarray([s["id"] for s in pred_list], dtype=np.int64), "prediction")
    pred_areas = np.bincount(pred_index, minlength=len(pred_list) + 1).tolist()
    segments = [dict(s, area=a) for s, a in zip(gt_list, gt_areas[1:]) if a > 0]
    segments_info = [
        dict(s, score=0.5 + 0.5 * float(torch.rand(1, generator=g)), area=a)
        for s, a in zip(pred_list, pred_areas[1:])
        if a > 0
    ]
    # semantic GT through the same index: class of each segment, ignore for void
    gt_class = torch.tensor([meta.ignore_label] + [s["category"] for s in gt_list], dtype=torch.int64)
    sem = gt_class[torch.from_numpy(gt_index).long()].view(h, w)
    gt = {"panoptic": gt_map, "segments": segments, "sem_seg": sem}
    prediction: dict = {"panoptic_seg": (pred_map, segments_info)}
    if cfg.with_instances:
        inst = [s for s in segments_info if meta.isthing[s["category_id"]]]
        ids = torch.tensor([s["id"] for s in inst], dtype=torch.int64)
        prediction["instances"] = {
            "masks": pred_map[None] == ids[:, None, None],
            "scores": torch.rand(len(inst), generator=g),
            "labels": torch.tensor([s["category_id"] for s in inst], dtype=torch.int64),
        }
    if cfg.with_sem_seg:
        pred_class = torch.tensor([0] + [s["category_id"] for s in pred_list], dtype=torch.int64)
        pred_sem = pred_class[torch.from_numpy(pred_index).long()].view(h, w)
        prediction["sem_seg"] = torch.nn.functional.one_hot(pred_sem, meta.num_classes).permute(2, 0, 1).float()
    return prediction, gt


def prediction_from_gt(gt: dict, meta: DatasetMeta) -> dict:
    """A perfect prediction for a GT dict: same id map, instances = the non-crowd thing segments (score 1),
    one-hot ``sem_seg`` from the GT semantic map (ignored pixels -> class 0)."""
    pan = gt["panoptic"]
    segments_info = [
        {
            "id": s["id"],
            "category_id": s["category"],
            "isthing": meta.isthing[s["category"]],
            "score": 1.0,
            "area": s.get("area", 0),
        }
        for s in gt["segments"]
    ]
    inst = [s for s in gt["segments"] if meta.isthing[s["category"]] and not s.get("iscrowd", 0)]
    ids = torch.tensor([s["id"] for s in inst], dtype=torch.int64)
    sem = gt["sem_seg"].clone()
    sem[sem == meta.ignore_label] = 0
    return {
        "panoptic_seg": (pan.clone(), segments_info),
        "instances": {
            "masks": pan[None] == ids[:, None, None],
            "scores": torch.ones(len(inst)),
            "labels": torch.tensor([s["category"] for s in inst], dtype=torch.int64),
        },
        "sem_seg": torch.nn.functional.one_hot(sem, meta.num_classes).permute(2, 0, 1).float(),
    }
