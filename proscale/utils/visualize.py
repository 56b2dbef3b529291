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


def _label_anchor(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the region's pixel nearest to its centroid (the centroid of a ring lies outside it)."""
    ys, xs = np.nonzero(region)
    cy, cx = ys.mean(), xs.mean()
    nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[nearest]), int(ys[nearest])


def labelled_overlay(
    image: np.ndarray,
    segment_ids: np.ndarray,
    segments: list[dict],
    class_names: list[str],
    colors: list | None = None,
    alpha: float = 0.55,
    min_side: int = 320,
) -> np.ndarray:
    """:func:`panoptic_overlay` with each segment's class name and score written on it and a legend of the
    classes present on the right; images with a short side below ``min_side`` are enlarged (nearest) first so
    the text stays readable.

    Args:
        image: (H, W, 3) uint8 RGB; segment_ids: (H, W) int, 0 = void.
        segments: dicts with ``id``, ``category_id`` (contiguous) and optionally ``score``.

    Returns:
        (H * s, W * s + legend width, 3) uint8 with s = ceil(min_side / min(H, W)) (1 for large images).
    """
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, -(-min_side // max(1, min(segment_ids.shape))))
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        segment_ids = np.repeat(np.repeat(segment_ids, scale, axis=0), scale, axis=1)
    canvas = Image.fromarray(panoptic_overlay(image, segment_ids, segments, colors, alpha))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    present: list[int] = []
    for segment in segments:
        region = segment_ids == segment["id"]
        if not region.any():
            continue
        category = int(segment["category_id"])
        if category not in present:
            present.append(category)
        name = class_names[category] if 0 <= category < len(class_names) else str(category)
        text = f"{name} {segment['score']:.2f}" if segment.get("score") is not None else name
        x, y = _label_anchor(region)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")
    return _with_legend(np.asarray(canvas), sorted(present), class_names, colors, font)


def _with_legend(
    overlay: np.ndarray, categories: list[int], class_names: list[str], colors: list | None, font: object
) -> np.ndarray:
    """Append a white panel listing a colour swatch + name per class to the right of ``overlay``."""
    from PIL import Image, ImageDraw

    names = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in categories] or ["(no segments)"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line, swatch, margin = 16, 12, 8
    width = margin * 3 + swatch + max(int(probe.textlength(name, font=font)) for name in names)
    height = max(overlay.shape[0], margin * 2 + line * len(names))
    panel = Image.new("RGB", (overlay.shape[1] + width, height), (255, 255, 255))
    panel.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(panel)
    x0 = overlay.shape[1] + margin
    for row, name in enumerate(names):
        y = margin + row * line
        if categories:
            draw.rectangle(
                (x0, y, x0 + swatch, y + swatch), fill=class_color(categories[row], colors), outline=(0, 0, 0)
            )
        draw.text((x0 + swatch + margin, y + swatch // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(panel)
