"""Offline scoring of COCO-format files (what ``scripts/score_coco.py`` runs).

- Panoptic: GT JSON + PNG folder vs prediction JSON + PNG folder (panopticapi formats) -> PQ / SQ / RQ, with the
  same statistics code as the training-time evaluator (``proscale.metrics.pq_stats``).
- Instance: COCO instance GT JSON (polygons or RLE) -- or a panoptic GT JSON + PNG folder, whose thing segments
  become the instances -- vs COCO results JSON -> mask AP through ``proscale.metrics.coco_ap``.

Every problem with the inputs is a ``ValueError`` that names the file and what is wrong: missing or corrupt
JSON/PNG, a PNG that is not RGB, an image without prediction, unknown category ids, segment ids present in a PNG
but not in its JSON or the reverse, results for unknown images or with malformed segmentations, scores that are
not finite numbers in [0, 1], RLE counts that do not decode to exactly the image's pixels.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from proscale.data.image_io import rgb_to_id
from proscale.metrics.coco_ap import coco_mask_ap
from proscale.metrics.pq_stats import IdIndexer, PQStats, SegmentsTable, pq_image_stats, summarize_pq
from proscale.metrics.rle import encode_masks, rle_problem
from proscale.utils.io import read_json


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """RGB-encoded panoptic PNG -> (H, W) int64 segment ids."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"panoptic PNG {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                raise ValueError(f"panoptic PNG {path} has mode {img.mode}; ids are encoded in RGB PNGs")
            rgb = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"panoptic PNG {path} cannot be read (corrupt or truncated): {err}") from None
    return rgb_to_id(rgb)


class _Categories:
    """Dataset category ids of a GT JSON -> contiguous indices, names and thing flags."""

    def __init__(self, gt: dict, gt_json: Path) -> None:
        cats = gt.get("categories")
        if not isinstance(cats, list) or not cats:
            raise ValueError(f"GT file {gt_json} has no 'categories' list")
        try:
            self.ids = [int(c["id"]) for c in cats]
            self.names = [str(c.get("name", c["id"])) for c in cats]
            self.isthing = [bool(c.get("isthing", 1)) for c in cats]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"GT file {gt_json}: malformed category entry ({err})") from None
        self.index = {cid: k for k, cid in enumerate(self.ids)}

    def contiguous(self, category_id: Any, where: str) -> int:
        if category_id not in self.index:
            raise ValueError(f"{where}: unknown category_id {category_id} (known: {sorted(self.index)})")
        return self.index[category_id]


def _segments(ann: dict, cats: _Categories, where: str, with_crowd: bool) -> SegmentsTable:
    try:
        infos = ann["segments_info"]
        ids = [int(s["id"]) for s in infos]
        cat = [cats.contiguous(s["category_id"], f"{where}, segment {s['id']}") for s in infos]
        crowd = [int(s.get("iscrowd", 0)) for s in infos] if with_crowd else None
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: malformed annotation, missing {err}") from None
    return SegmentsTable.from_lists(ids, cat, crowd)


def _pq_chunk(pairs: list[tuple], num_classes: int) -> tuple[np.ndarray, ...]:
    """Worker: PQ statistics summed over (gt_png, gt_segments, pred_png, pred_segments, where) tuples."""
    torch.set_num_threads(1)
    indexer = IdIndexer()
    total = PQStats.zeros(num_classes)
    for gt_png, gt_segs, pred_png, pred_segs, where in pairs:
        gt_map = torch.from_numpy(read_panoptic_png(gt_png))
        pred_map = torch.from_numpy(read_panoptic_png(pred_png))
        if gt_map.shape != pred_map.shape:
            raise ValueError(f"{pred_png}: size {tuple(pred_map.shape)} differs from GT {gt_png} {tuple(gt_map.shape)}")
        try:
            total += pq_image_stats(
                gt_map, gt_segs, pred_map, pred_segs, num_classes, indexer, skip_empty_predictions=False
            )
        except ValueError as err:  # messages start with "GT" when the GT side is at fault
            culprit = gt_png if str(err).startswith("GT") else pred_png
            raise ValueError(f"{culprit} ({where}): {err}") from None
    return total.iou_sum, total.tp, total.fp, total.fn


def evaluate_panoptic_files(
    gt_json: str | Path, gt_dir: str | Path, pred_json: str | Path, pred_dir: str | Path, workers: int = 1
) -> tuple[dict[str, float], list[dict]]:
    """PQ of a panoptic prediction (JSON + PNG folder) against the GT; returns ``(metrics, per_class)`` as
    ``proscale.metrics.pq_stats.summarize_pq``."""
    gt_json, gt_dir, pred_json, pred_dir = Path(gt_json), Path(gt_dir), Path(pred_json), Path(pred_dir)
    for folder, what in ((gt_dir, "GT PNG folder"), (pred_dir, "prediction PNG folder")):
        if not folder.is_dir():
            raise ValueError(f"{what} {folder} does not exist")
    gt = read_json(gt_json, "GT file")
    pred = read_json(pred_json, "prediction file")
    cats = _Categories(gt, gt_json)
    pred_anns = pred.get("annotations") if isinstance(pred, dict) else pred
    if not isinstance(pred_anns, list):
        raise ValueError(f"prediction file {pred_json} has no 'annotations' list")
    by_image: dict[Any, dict] = {}
    for ann in pred_anns:
        if not isinstance(ann, dict) or "image_id" not in ann or "file_name" not in ann:
            raise ValueError(f"prediction file {pred_json}: annotation without image_id/file_name: {str(ann)[:200]}")
        if ann["image_id"] in by_image:
            raise ValueError(f"prediction file {pred_json}: two annotations for image_id {ann['image_id']}")
        by_image[ann["image_id"]] = ann
    gt_anns = gt.get("annotations")
    if not isinstance(gt_anns, list):
        raise ValueError(f"GT file {gt_json} has no 'annotations' list")
    known_images = {a.get("image_id") for a in gt_anns}
    extra = [i for i in by_image if i not in known_images]
    if extra:
        raise ValueError(f"prediction file {pred_json}: image_ids {extra[:10]} are not in the GT file {gt_json}")

    pairs = []
    for ann in gt_anns:
        image_id = ann.get("image_id")
        if image_id not in by_image:
            raise ValueError(f"prediction file {pred_json} has no prediction for image_id {image_id}")
        p = by_image[image_id]
        gt_segs = _segments(ann, cats, f"GT file {gt_json}, image_id {image_id}", with_crowd=True)
        pred_segs = _segments(p, cats, f"prediction file {pred_json}, image_id {image_id}", with_crowd=False)
        pairs.append((gt_dir / ann["file_name"], gt_segs, pred_dir / p["file_name"], pred_segs, f"image_id {image_id}"))

    k = len(cats.ids)
    workers = max(1, min(workers, len(pairs)))
    if workers == 1:
        parts = [_pq_chunk(pairs, k)]
    else:
        chunks = [pairs[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_pq_chunk, chunks, [k] * workers))
    total = PQStats.zeros(k)
    for iou, tp, fp, fn in parts:
        total += PQStats(iou, tp, fp, fn)
    return summarize_pq(total, cats.isthing, cats.names, cats.ids)


def _panoptic_gt_to_instances(gt: dict, gt_json: Path, gt_dir: Path, cats: _Categories) -> list[dict]:
    """Thing segments of a panoptic GT (JSON + PNGs) -> COCO instance annotations with RLE masks."""
    anns = []
    for ann in gt["annotations"]:
        where = f"GT file {gt_json}, image_id {ann.get('image_id')}"
        segs = [s for s in ann["segments_info"] if cats.isthing[cats.contiguous(s["category_id"], where)]]
        if not segs:
            continue
        id_map = torch.from_numpy(read_panoptic_png(gt_dir / ann["file_name"]))
        ids = torch.tensor([int(s["id"]) for s in segs])
        masks = id_map[None] == ids[:, None, None]
        for seg, rle, area in zip(segs, encode_masks(masks), masks.flatten(1).sum(1).tolist()):
            if area == 0:
                continue
            anns.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": int(seg["category_id"]),
                    "segmentation": rle,
                    "area": float(area),
                    "iscrowd": int(seg.get("iscrowd", 0)),
                }
            )
    return anns


def _check_results(results: Any, pred_json: Path, images: dict, cat_ids: set) -> list[dict]:
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise ValueError(f"prediction file {pred_json} must hold a list of COCO results")
    results = list(results)
    for n, r in enumerate(results):
        where = f"prediction file {pred_json}, result #{n}"
        if not isinstance(r, dict) or not {"image_id", "category_id", "segmentation", "score"} <= set(r):
            raise ValueError(f"{where}: needs image_id, category_id, segmentation and score")
        if r["image_id"] not in images:
            raise ValueError(f"{where}: image_id {r['image_id']} is not in the GT")
        if r["category_id"] not in cat_ids:
            raise ValueError(f"{where}: unknown category_id {r['category_id']} (known: {sorted(cat_ids)})")
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            # NaN fails both comparisons; COCOeval would sort it anywhere and report a meaningless AP
            raise ValueError(f"{where}: score must be a finite number in [0, 1], got {score!r}{_entry(r)}")
        seg = r["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise ValueError(f"{where}: segmentation must be an RLE dict with 'size' and 'counts'")
        img = images[r["image_id"]]
        if list(seg["size"]) != [img["height"], img["width"]]:
            raise ValueError(
                f"{where}: mask size {seg['size']} differs from image size {[img['height'], img['width']]}"
            )
        problem = rle_problem(seg, img["height"], img["width"])
        if problem:  # pycocotools would decode garbage counts into an arbitrary mask without complaint
            raise ValueError(f"{where}: {problem}{_entry(r)}")
        if isinstance(seg["counts"], list):  # uncompressed RLE: COCOeval takes compressed counts only
            results[n] = {**r, "segmentation": _compress(seg)}
    return results


def _compress(rle: dict) -> dict:
    from pycocotools import mask as mask_utils

    height, width = (int(v) for v in rle["size"])
    compressed = mask_utils.frPyObjects({"size": [height, width], "counts": rle["counts"]}, height, width)
    return {"size": [height, width], "counts": compressed["counts"].decode("ascii")}


def _entry(result: dict) -> str:
    """The offending result, shortened, for error messages."""
    text = repr({k: result[k] for k in ("image_id", "category_id", "score", "segmentation") if k in result})
    return f"; entry: {text[:200]}{'...' if len(text) > 200 else ''}"


def evaluate_instance_files(
    gt_json: str | Path, pred_json: str | Path, gt_dir: str | Path | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Mask AP of COCO results against a COCO instance GT, or against the thing segments of a panoptic GT
    (then ``gt_dir`` holds its PNGs). Returns ``(metrics, per_class)`` as ``coco_mask_ap``."""
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt = read_json(gt_json, "GT file")
    results = read_json(pred_json, "prediction file")
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
        raise ValueError(f"GT file {gt_json} has no 'images' list")
    cats = _Categories(gt, gt_json)
    gt_anns = gt.get("annotations", [])
    if gt_anns and "segments_info" in gt_anns[0]:
        if gt_dir is None or not Path(gt_dir).is_dir():
            raise ValueError(f"GT file {gt_json} is panoptic; its PNG folder (--gt-dir) is needed, got {gt_dir}")
        gt_anns = _panoptic_gt_to_instances(gt, gt_json, Path(gt_dir), cats)
    categories = [{"id": cid, "name": n} for cid, n, t in zip(cats.ids, cats.names, cats.isthing) if t]
    try:
        images = {im["id"]: {"id": im["id"], "height": im["height"], "width": im["width"]} for im in gt["images"]}
    except (KeyError, TypeError) as err:
        raise ValueError(f"GT file {gt_json}: image entries need id, height and width ({err})") from None
    results = _check_results(results, pred_json, images, {c["id"] for c in categories})
    return coco_mask_ap(list(images.values()), gt_anns, categories, results)


def scoring_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
