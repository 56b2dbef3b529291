"""Mask AP with pycocotools' COCOeval on in-memory COCO dicts (no files), quietly.

``coco_mask_ap`` is the single place where AP is computed, for the training-time evaluator
(``proscale.metrics.instance``) and for offline files (``scripts/score_coco.py``), so both report the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_from_dataset(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_mask_ap(
    images: list[dict], gt_annotations: list[dict], categories: list[dict], results: list[dict]
) -> tuple[dict[str, float], list[dict]]:
    """COCO mask AP (``iouType="segm"``, maxDets 100) of ``results`` against ``gt_annotations``.

    Args:
        images: ``[{"id", "height", "width"}]`` every evaluated image (also those without annotations).
        gt_annotations: ``[{"image_id", "category_id", "segmentation" (RLE), "area", "iscrowd"}]``; ``id`` is
            assigned here when missing.
        categories: ``[{"id", "name"}]`` the evaluated (thing) categories.
        results: COCO results ``[{"image_id", "category_id", "segmentation" (RLE), "score"}]``.

    Returns:
        ``(metrics, per_class)``: ``AP, AP50, AP75, APs, APm, APl`` on the 0-100 scale (NaN where COCOeval has no
        ground truth to score, e.g. APs without small objects), and ``[{"category_id", "name", "AP"}]``.
    """
    gt_anns = []
    for i, ann in enumerate(gt_annotations, start=1):
        ann = dict(ann)
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        gt_anns.append(ann)
    dataset = {"images": list(images), "annotations": gt_anns, "categories": list(categories)}
    coco_gt = _coco_from_dataset(dataset)
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
    else:  # loadRes cannot take an empty list; an empty result set scores 0 wherever there is ground truth
        coco_dt = _coco_from_dataset({"images": list(images), "annotations": [], "categories": list(categories)})

    evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {k: (100.0 * float(v) if v >= 0 else math.nan) for k, v in zip(AP_KEYS, evaluator.stats[:6])}

    # precision: (iou thresholds, recall points, categories, area ranges, max dets); area "all", maxDets 100
    precision = evaluator.eval["precision"]
    per_class = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class.append(
            {"category_id": int(cat_id), "name": name, "AP": 100.0 * float(np.mean(p)) if p.size else math.nan}
        )
    return metrics, per_class
