"""Collate dataset items into the batch dict documented in :mod:`proscale.structures`.

Each dataset item is a dict::

    {"image": ByteTensor (3, h, w) RGB 0-255 after augmentation,
     "pad_to": (H, W) | None       minimum canvas (LSJ / crop recipes pad to their crop size),
     "labels": LongTensor (N,), "masks": BoolTensor (N, h, w)   training targets at the augmented size,
     "image_id": int, "file_name": str, "orig_size": (h0, w0),
     "gt": dict (optional, evaluation ground truth at the original size)}

The collate normalises each image with ``PIXEL_MEAN`` / ``PIXEL_STD``, zero-pads all of them (after
normalisation, so padding is 0 like the original's ImageList) to a common (H, W) that is at least every
``pad_to`` and a multiple of ``SIZE_DIVISIBILITY``, pads the masks with False, and records each image's
valid region in ``image_sizes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from proscale.structures import PIXEL_MEAN, PIXEL_STD, SIZE_DIVISIBILITY

_MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
_STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


def padded_size(sizes: Sequence[tuple[int, int]], divisibility: int = SIZE_DIVISIBILITY) -> tuple[int, int]:
    """Smallest (H, W) >= every size, rounded up to a multiple of ``divisibility``."""
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    return math.ceil(height / divisibility) * divisibility, math.ceil(width / divisibility) * divisibility


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """(3, h, w) uint8/float RGB 0-255 -> float32 normalised with the ImageNet statistics."""
    return (image.float() - _MEAN) / _STD


def collate_batch(items: Sequence[dict[str, Any]], divisibility: int = SIZE_DIVISIBILITY) -> dict[str, Any]:
    """List of dataset items -> batch dict (see module docstring and ``proscale.structures``)."""
    if not items:
        raise ValueError("collate_batch: empty list of items")
    image_sizes = [(int(it["image"].shape[-2]), int(it["image"].shape[-1])) for it in items]
    canvases = [tuple(it["pad_to"]) if it.get("pad_to") else size for it, size in zip(items, image_sizes)]
    canvases += image_sizes  # a crop may have been larger than its recorded pad_to (never smaller)
    height, width = padded_size(canvases, divisibility)

    images = torch.zeros(len(items), 3, height, width, dtype=torch.float32)
    targets = []
    for index, (item, (h, w)) in enumerate(zip(items, image_sizes)):
        images[index, :, :h, :w] = normalize_image(item["image"])
        masks = item["masks"]
        padded_masks = torch.zeros(masks.shape[0], height, width, dtype=torch.bool)
        padded_masks[:, :h, :w] = masks
        targets.append({"labels": item["labels"].long(), "masks": padded_masks})

    batch: dict[str, Any] = {
        "images": images,
        "image_sizes": image_sizes,
        "orig_sizes": [tuple(int(s) for s in it["orig_size"]) for it in items],
        "image_ids": [it["image_id"] for it in items],
        "file_names": [it["file_name"] for it in items],
        "targets": targets,
    }
    if all("gt" in it for it in items):
        batch["gt"] = [it["gt"] for it in items]
    return batch
