"""Panoptic overlays for W&B validation samples and ``scripts/predict.py``."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch import Tensor

from proscale.structures import PIXEL_MEAN, PIXEL_STD


def denormalize(image: Tensor) -> np.ndarray:
    """(3, H, W) normalized float tensor -> (H, W, 3) uint8 RGB."""
    mean = torch.tensor(PIXEL_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=image.device).view(3, 1, 1)
    rgb = (image.float() * std + mean).clamp(0, 255).round().to(torch.uint8)
    return rgb.permute(1, 2, 0).cpu().numpy()


def class_color(category: int, colors: list | None = None) -> tuple[int, int, int]:
    """The dataset's colour for a class when it has one, else a distinct colour from the golden-ratio hue walk."""
    if colors and 0 <= category < len(colors):
        return tuple(int(c) for c in colors[category])  # type: ignore[return-value]
    hue = (category * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def panoptic_overlay(
    image: np.ndarray, segment_ids: np.ndarray, segments: list[dict], colors: list | None = None, alpha: float = 0.55
) -> np.ndarray:
    """Blend each segment's class colour into ``image`` and draw segment boundaries.

    Args:
        image: (H, W, 3) uint8 RGB.
        segment_ids: (H, W) integer map, 0 = void (left untouched).
        segments: dicts with ``id`` and ``category_id`` (contiguous); thing instances get a per-instance
            brightness jitter so touching instances of one class stay distinguishable.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.shape[:2] != segment_ids.shape:
        raise ValueError(f"panoptic_overlay: image {image.shape[:2]} and segment map {segment_ids.shape} differ")
    out = image.astype(np.float32).copy()
    for index, segment in enumerate(segments):
        region = segment_ids == segment["id"]
        if not region.any():
            continue
        color = np.array(class_color(int(segment["category_id"]), colors), dtype=np.float32)
        if segment.get("isthing"):
            color = np.clip(color * (0.75 + 0.5 * ((index * 0.37) % 1.0)), 0, 255)
        out[region] = (1 - alpha) * out[region] + alpha * color
    boundary = np.zeros(segment_ids.shape, dtype=bool)
    boundary[1:, :] |= segment_ids[1:, :] != segment_ids[:-1, :]
    boundary[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    out[boundary] = 255.0
    return out.round().astype(np.uint8)
