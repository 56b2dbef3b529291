"""Writers of tiny COCO-format datasets, for tests (here and in other packages' tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from proscale.data.image_io import id_to_rgb


def write_coco_panoptic(
    image_dir: str | Path,
    panoptic_dir: str | Path,
    json_path: str | Path,
    samples: list[dict],
    categories: list[dict],
) -> None:
    """Write images, panoptic PNGs and the JSON.

    ``samples``: dicts with ``image`` (H, W, 3) uint8, ``ids`` (H, W) segment ids, ``segments_info``
    (COCO dicts: id, category_id, iscrowd, optional area), ``image_id`` and ``file_name`` (image file; the
    PNG gets the same stem). Areas missing from ``segments_info`` are filled from ``ids``.
    """
    image_dir, panoptic_dir, json_path = Path(image_dir), Path(panoptic_dir), Path(json_path)
    for folder in (image_dir, panoptic_dir, json_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for sample in samples:
        image, ids = sample["image"], np.asarray(sample["ids"])
        Image.fromarray(image).save(image_dir / sample["file_name"])
        png_name = Path(sample["file_name"]).stem + ".png"
        Image.fromarray(id_to_rgb(ids)).save(panoptic_dir / png_name)
        segments = [{"area": int((ids == s["id"]).sum()), "iscrowd": 0, **s} for s in sample["segments_info"]]
        images.append(
            {"id": sample["image_id"], "file_name": sample["file_name"], "height": ids.shape[0], "width": ids.shape[1]}
        )
        annotations.append({"image_id": sample["image_id"], "file_name": png_name, "segments_info": segments})
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
