"""Prediction export in the official COCO formats, written atomically (:mod:`proscale.utils.io`), so an
interrupted run never leaves a half-written PNG or JSON.

Panoptic (panopticapi's results format): one PNG per image whose RGB encodes the segment id
(``id = R + 256 * G + 256**2 * B``, 0 = void) plus one JSON::

    {"annotations": [{"image_id", "file_name": "<stem>.png",
                      "segments_info": [{"id", "category_id" (dataset id), "iscrowd": 0, "area", "isthing"}]}],
     "categories": [{"id", "name", "isthing"}]}

Instance (COCO results format): ``[{"image_id", "category_id", "segmentation": {"size", "counts"}, "score"}]``.

Under DDP each rank writes the PNGs of its own images; ``finalize`` gathers the JSON records to rank 0, which
writes the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from proscale.data.image_io import id_to_rgb
from proscale.metrics.instance import instance_results
from proscale.metrics.pq_stats import IdIndexer
from proscale.structures import DatasetMeta
from proscale.utils.io import atomic_write_json, atomic_write_png


def panoptic_to_coco(
    panoptic_seg: tuple[torch.Tensor, list[dict]], meta: DatasetMeta, image_id: int, png_name: str
) -> tuple[np.ndarray, dict]:
    """One inference ``panoptic_seg`` -> (RGB PNG array, COCO panoptic annotation).

    Listed segments without a pixel are dropped (panopticapi rejects JSON ids absent from the PNG); a pixel id
    that is not listed raises ``ValueError``.
    """
    id_map, segments_info = panoptic_seg
    ids = np.asarray([int(s["id"]) for s in segments_info], dtype=np.int64)
    index = IdIndexer()(id_map.cpu(), ids, f"panoptic prediction of image {image_id}")
    areas = np.bincount(index, minlength=len(segments_info) + 1)[1:].tolist()
    segments = []
    for seg, area in zip(segments_info, areas):
        if area == 0:
            continue
        k = int(seg["category_id"])
        if not 0 <= k < meta.num_classes:
            raise ValueError(f"image {image_id}: segment {seg['id']} has class {k} outside [0, {meta.num_classes})")
        segments.append(
            {
                "id": int(seg["id"]),
                "category_id": meta.category_ids[k],
                "iscrowd": 0,
                "area": int(area),
                "isthing": int(meta.isthing[k]),
            }
        )
    annotation = {"image_id": image_id, "file_name": png_name, "segments_info": segments}
    return id_to_rgb(id_map.cpu().numpy()), annotation


def coco_categories(meta: DatasetMeta) -> list[dict]:
    return [
        {"id": cid, "name": name, "isthing": int(thing)}
        for cid, name, thing in zip(meta.category_ids, meta.class_names, meta.isthing)
    ]


def _gather_to_rank0(records: list) -> list | None:
    """All records on rank 0 (None elsewhere); the records themselves outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part] if dist.get_rank() == 0 else None


class PanopticExporter:
    """Writes ``<out_dir>/<png_dir>/<stem>.png`` per image and ``<out_dir>/<json_name>`` at ``finalize``."""

    def __init__(
        self,
        out_dir: str | Path,
        meta: DatasetMeta,
        json_name: str = "panoptic_pred.json",
        png_dir: str = "panoptic_pred",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.json_path = self.out_dir / json_name
        self.png_dir = self.out_dir / png_dir
        self.annotations: list[dict] = []

    def add(self, image_id: int, file_name: str, prediction: dict) -> None:
        """``prediction``: an inference output dict (uses ``panoptic_seg``); ``file_name`` of the input image."""
        png_name = Path(file_name).stem + ".png"
        rgb, annotation = panoptic_to_coco(prediction["panoptic_seg"], self.meta, int(image_id), png_name)
        atomic_write_png(self.png_dir / png_name, rgb)
        self.annotations.append(annotation)

    def finalize(self) -> Path | None:
        """Write the JSON (rank 0); returns its path there, None on other ranks."""
        annotations = _gather_to_rank0(self.annotations)
        if annotations is None:
            return None
        annotations = sorted(annotations, key=lambda a: a["image_id"])
        atomic_write_json(self.json_path, {"annotations": annotations, "categories": coco_categories(self.meta)}, compact=True)
        return self.json_path


class InstanceExporter:
    """Collects COCO instance results (thing classes, RLE) and writes them to ``json_path`` at ``finalize``."""

    def __init__(self, json_path: str | Path, meta: DatasetMeta) -> None:
        self.json_path = Path(json_path)
        self.meta = meta
        self.results: list[dict] = []

    def add(self, image_id: int, prediction: dict) -> None:
        self.results.extend(instance_results(prediction["instances"], self.meta, int(image_id)))

    def finalize(self) -> Path | None:
        results = _gather_to_rank0(self.results)
        if results is None:
            return None
        atomic_write_json(self.json_path, results, compact=True)
        return self.json_path
