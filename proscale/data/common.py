"""Pieces shared by the dataset readers: size checks, the item dict, semantic maps, expected layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from proscale.data.categories import builtin_meta, meta_from_categories
from proscale.data.transforms import Sample
from proscale.structures import DatasetMeta
from proscale.utils.io import read_json

# how data loaders name an annotation file in their errors
ANNOTATION_JSON = "annotation JSON"


def check_size(path: Path | str, actual: tuple[int, int], expected: tuple[int, int], what: str) -> None:
    """Raise ``ValueError`` naming ``path`` when an image / annotation size disagrees with its reference."""
    if tuple(actual) != tuple(expected):
        raise ValueError(
            f"{path}: size {actual[0]}x{actual[1]} (h x w) does not match {what} {expected[0]}x{expected[1]}"
        )


def make_item(
    sample: Sample,
    labels: list[int],
    masks: list[np.ndarray],
    *,
    image_id: int,
    file_name: str,
    orig_size: tuple[int, int],
    gt: dict[str, Any] | None,
) -> dict[str, Any]:
    """Build the dataset item documented in :mod:`proscale.data.collate` (tensors, CHW image)."""
    h, w = sample.size
    item: dict[str, Any] = {
        "image": torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1))),
        "pad_to": sample.pad_to,
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool),
        "image_id": image_id,
        "file_name": file_name,
        "orig_size": tuple(int(s) for s in orig_size),
    }
    if gt is not None:
        item["gt"] = gt
    return item


def semantic_targets(sem_seg: np.ndarray, ignore_label: int) -> tuple[list[int], list[np.ndarray]]:
    """(H, W) class map -> one (label, mask) per class present (ignore excluded), as MaskFormer trains."""
    classes = [int(c) for c in np.unique(sem_seg) if c != ignore_label]
    return classes, [sem_seg == c for c in classes]


def require_paths(paths: dict[str, Path], dataset: str, layout: str) -> None:
    """Raise ``ValueError`` listing the missing paths and the expected folder tree when any is absent."""
    missing = [f"{what}: {path}" for what, path in paths.items() if not Path(path).exists()]
    if missing:
        raise ValueError(
            f"{dataset} dataset not found; missing " + "; ".join(missing) + f". Expected layout:\n{layout}"
        )


def resolve_meta(meta: DatasetMeta | str, json_path: Path, what: str, dataset: str, layout: str) -> DatasetMeta:
    """A datamodule's ``meta`` argument -> DatasetMeta: a DatasetMeta as is, ``"json"`` = the categories of
    ``json_path`` (custom COCO-format data), any other string = a built-in class table (``builtin_meta``)."""
    if not isinstance(meta, str):
        return meta
    if meta != "json":
        return builtin_meta(meta)
    require_paths({f"{what} (for the categories)": json_path}, dataset, layout)
    return meta_from_categories(read_json(json_path, ANNOTATION_JSON).get("categories", []), str(json_path))
