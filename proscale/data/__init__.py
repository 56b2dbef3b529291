"""Datasets, augmentations and datamodules (COCO panoptic/instance, ADE20K, Cityscapes, synthetic).

Light by design: the generator and readers import without Lightning; the datamodules are loaded on
first access (``from proscale.data import SyntheticDataModule``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SegmentationDataModule": "proscale.data.datamodule",
    "PanopticDataModule": "proscale.data.coco_panoptic",
    "CocoPanopticDataModule": "proscale.data.coco_panoptic",
    "CocoPanopticDataset": "proscale.data.coco_panoptic",
    "CocoInstanceDataModule": "proscale.data.coco_instance",
    "CocoInstanceDataset": "proscale.data.coco_instance",
    "ADE20KSemanticDataModule": "proscale.data.ade20k",
    "ADE20KPanopticDataModule": "proscale.data.ade20k",
    "SemanticSegDataset": "proscale.data.ade20k",
    "CityscapesPanopticDataModule": "proscale.data.cityscapes",
    "SyntheticDataModule": "proscale.data.synthetic_datamodule",
    "SyntheticConfig": "proscale.data.synthetic",
    "ensure_synthetic": "proscale.data.synthetic",
    "synthetic_meta": "proscale.data.synthetic",
    "collate_batch": "proscale.data.collate",
    "read_rgb_image": "proscale.data.image_io",
    "read_panoptic_png": "proscale.data.image_io",
    "rgb_to_id": "proscale.data.image_io",
    "id_to_rgb": "proscale.data.image_io",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'proscale.data' has no attribute {name!r}")
