"""Panoptic overlays with class names, scores and a legend: one drawing code for ``scripts/predict.py``'s
overlays, the train task's ``predictions_val.png`` (:class:`proscale.lightning.prediction_grid.PredictionGrid`), the W&B
validation images (:class:`proscale.lightning.callbacks.WandbExtras`) and ``notebooks/inspect_predictions.ipynb``.

Small images are enlarged (nearest) so the text stays legible; a panel with nothing to draw says so.
"""

from __future__ import annotations

import colorsys
from typing import Any

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


# Messages drawn in a panel that has nothing to show (an empty axis would look like a rendering bug).
NO_PREDICTED_SEGMENTS = "no segment above the score threshold"
NO_GT_SEGMENTS = "no ground-truth segments"
NO_GROUND_TRUTH = "no ground truth for this image"


def _font(size: int) -> Any:
    """Pillow's built-in font at ``size`` px (scalable with FreeType, else its fixed 11 px bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _font_for(height: int) -> Any:
    return _font(max(12, height // 18))


def enlarge(array: np.ndarray, min_side: int) -> np.ndarray:
    """Repeat pixels (nearest) by the smallest integer factor that brings the short side to ``min_side``."""
    scale = max(1, -(-min_side // max(1, min(array.shape[:2]))))
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def _draw_message(draw: Any, size: tuple[int, int], text: str, font: Any) -> None:
    """``text`` centred in a (W, H) canvas, white on a black box, broken into lines that fit the width."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= size[0] - 12:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    boxes = [draw.textbbox((0, 0), line, font=font, anchor="lt") for line in lines]
    line_height = max(bottom for _, _, _, bottom in boxes) + 4
    width = max(right for _, _, right, _ in boxes)
    x, top = size[0] // 2, size[1] // 2 - line_height * len(lines) // 2
    draw.rectangle(
        (x - width // 2 - 4, top - 3, x + width // 2 + 4, top + line_height * len(lines) + 1), fill=(0, 0, 0)
    )
    for row, line in enumerate(lines):
        draw.text((x, top + row * line_height), line, fill=(255, 255, 255), font=font, anchor="mt")


def message_panel(text: str, height: int, width: int) -> np.ndarray:
    """A grey (height, width, 3) uint8 panel that says ``text``."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (200, 200, 200))
    _draw_message(ImageDraw.Draw(canvas), (width, height), text, _font_for(height))
    return np.asarray(canvas)


def draw_labelled_segments(
    image: np.ndarray,
    segment_ids: np.ndarray,
    segments: list[dict],
    class_names: list[str],
    colors: list | None = None,
    alpha: float = 0.55,
    min_side: int = 320,
    empty_message: str = NO_PREDICTED_SEGMENTS,
) -> tuple[np.ndarray, list[int]]:
    """:func:`panoptic_overlay` enlarged (nearest) to a short side of at least ``min_side``, with each segment's
    class name (and score, when the segment has one) written on it; ``empty_message`` when no segment has a pixel.

    Args:
        image: (H, W, 3) uint8 RGB; segment_ids: (H, W) int, 0 = void.
        segments: dicts with ``id``, ``category_id`` (contiguous), optionally ``score`` and ``isthing``.

    Returns:
        ((H * s, W * s, 3) uint8, the sorted contiguous classes drawn) with s = ceil(min_side / min(H, W)) (>= 1).
    """
    from PIL import Image, ImageDraw

    image, segment_ids = enlarge(image, min_side), enlarge(segment_ids, min_side)
    canvas = Image.fromarray(panoptic_overlay(image, segment_ids, segments, colors, alpha))
    draw = ImageDraw.Draw(canvas)
    font = _font_for(min(segment_ids.shape))
    present: set[int] = set()
    for segment in segments:
        region = segment_ids == segment["id"]
        if not region.any():
            continue
        category = int(segment["category_id"])
        present.add(category)
        text = _class_name(category, class_names)
        if segment.get("score") is not None:
            text = f"{text} {float(segment['score']):.2f}"
        x, y = _label_anchor(region)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
        # shifted inside the canvas: a segment at the border must not lose the start or end of its name
        dx = max(0, 2 - left) - max(0, right + 2 - canvas.width)
        dy = max(0, 1 - top) - max(0, bottom + 1 - canvas.height)
        draw.rectangle((left + dx - 2, top + dy - 1, right + dx + 2, bottom + dy + 1), fill=(0, 0, 0))
        draw.text((x + dx, y + dy), text, fill=(255, 255, 255), font=font, anchor="mm")
    if not present:
        _draw_message(draw, canvas.size, empty_message, font)
    return np.asarray(canvas), sorted(present)


def labelled_overlay(
    image: np.ndarray,
    segment_ids: np.ndarray,
    segments: list[dict],
    class_names: list[str],
    colors: list | None = None,
    alpha: float = 0.55,
    min_side: int = 320,
    empty_message: str = NO_PREDICTED_SEGMENTS,
) -> np.ndarray:
    """:func:`draw_labelled_segments` with a legend of the classes present on the right (``predict``'s overlays).

    Returns:
        (H * s, W * s + legend width, 3) uint8 (taller when the legend needs more rows than the image has).
    """
    overlay, present = draw_labelled_segments(
        image, segment_ids, segments, class_names, colors, alpha, min_side, empty_message
    )
    return hstack([overlay, legend_panel(present, class_names, colors, overlay.shape[0])])


def _class_name(category: int, class_names: list[str]) -> str:
    return class_names[category] if 0 <= category < len(class_names) else str(category)


def legend_panel(
    categories: list[int], class_names: list[str], colors: list | None, height: int, title: str | None = None
) -> np.ndarray:
    """A white (>= height, width, 3) uint8 panel: an optional title, then a colour swatch + name per class
    ("(no classes)" when there are none)."""
    from PIL import Image, ImageDraw

    font = _font_for(height)
    line = int(font.size * 1.4) if hasattr(font, "size") else 16
    swatch, margin = line - 4, 8
    names = [_class_name(c, class_names) for c in categories] or ["(no classes)"]
    rows = ([title] if title else []) + names
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = margin * 3 + swatch + max(int(probe.textlength(text, font=font)) for text in rows)
    panel = Image.new("RGB", (width, max(height, margin * 2 + line * len(rows))), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    y = margin
    if title:
        draw.text((margin, y + swatch // 2), title, fill=(0, 0, 0), font=font, anchor="lm")
        y += line
    for index, name in enumerate(names):
        if categories:
            fill = class_color(categories[index], colors)
            draw.rectangle((margin, y, margin + swatch, y + swatch), fill=fill, outline=(0, 0, 0))
        draw.text((margin * 2 + swatch, y + swatch // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
        y += line
    return np.asarray(panel)


def hstack(panels: list[np.ndarray], gap: int = 0) -> np.ndarray:
    """Panels side by side, top-aligned, padded with white to the tallest."""
    return _stack(panels, gap, axis=1)


def vstack(panels: list[np.ndarray], gap: int = 0) -> np.ndarray:
    """Panels one below the other, left-aligned, padded with white to the widest."""
    return _stack(panels, gap, axis=0)


def _stack(panels: list[np.ndarray], gap: int, axis: int) -> np.ndarray:
    other = 1 - axis
    extent = max(p.shape[other] for p in panels)
    padded = []
    for index, panel in enumerate(panels):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[other] = (0, extent - panel.shape[other])
        if index < len(panels) - 1:
            pad[axis] = (0, gap)
        padded.append(np.pad(panel, pad, constant_values=255))
    return np.concatenate(padded, axis=axis)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` under a white strip holding ``title``."""
    from PIL import Image, ImageDraw

    font = _font_for(panel.shape[0])
    strip = Image.new("RGB", (panel.shape[1], int(font.size * 1.6) if hasattr(font, "size") else 18), "white")
    ImageDraw.Draw(strip).text((4, strip.height // 2), title, fill=(0, 0, 0), font=font, anchor="lm")
    return vstack([np.asarray(strip), panel])


# ------------------------------------------------------------------------------------------------ GT | prediction
def comparison_sample(batch: dict, index: int, prediction: dict, isthing: list[bool] | None = None) -> dict:
    """What :func:`comparison_row` draws for image ``index`` of an evaluation batch (:mod:`proscale.structures`)
    and its inference output, as NumPy at the original size.

    Returns:
        {"image": (h0, w0, 3) uint8, "file_name", "segment_ids": (h0, w0) int, "segments" (the prediction's),
         "gt_segment_ids": (h0, w0) int or None, "gt_segments": [{"id", "category_id", "isthing"}] or None}
    """
    h, w = batch["image_sizes"][index]
    image = batch["images"][index, :, :h, :w][None].float()
    image = torch.nn.functional.interpolate(image, size=tuple(batch["orig_sizes"][index]), mode="bilinear")[0]
    segment_ids, segments = prediction["panoptic_seg"]
    sample = {
        "image": denormalize(image),
        "file_name": str(batch["file_names"][index]),
        "segment_ids": segment_ids.cpu().numpy(),
        "segments": list(segments),
        "gt_segment_ids": None,
        "gt_segments": None,
    }
    gt = (batch.get("gt") or [None] * (index + 1))[index]
    if gt is not None and "panoptic" in gt:
        things = {index for index, thing in enumerate(isthing or []) if thing}
        sample["gt_segment_ids"] = gt["panoptic"].cpu().numpy()
        sample["gt_segments"] = [
            {
                "id": int(s["id"]),
                "category_id": int(s["category"]),
                "isthing": int(s["category"]) in things,
            }
            for s in gt["segments"]
        ]
    return sample


def comparison_row(sample: dict, class_names: list[str], colors: list | None = None, min_side: int = 256) -> np.ndarray:
    """image | ground truth (class names) | prediction (class names + scores) | legend of the classes in either,
    each panel enlarged (nearest) to a short side of at least ``min_side`` and titled.

    Args:
        sample: a :func:`comparison_sample` dict.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    image = enlarge(sample["image"], min_side)
    if sample.get("gt_segment_ids") is not None:
        gt, gt_classes = draw_labelled_segments(
            sample["image"], sample["gt_segment_ids"], sample["gt_segments"], class_names, colors,
            min_side=min_side, empty_message=NO_GT_SEGMENTS,
        )  # fmt: skip
        gt_title = f"ground truth ({_segment_count(sample['gt_segment_ids'], sample['gt_segments'])})"
    else:
        gt, gt_classes, gt_title = message_panel(NO_GROUND_TRUTH, *image.shape[:2]), [], "ground truth"
    prediction, predicted_classes = draw_labelled_segments(
        sample["image"], sample["segment_ids"], sample["segments"], class_names, colors, min_side=min_side
    )
    panels = [
        _titled(image, str(sample.get("file_name") or "image")),
        _titled(gt, gt_title),
        _titled(prediction, f"prediction ({_segment_count(sample['segment_ids'], sample['segments'])}; class score)"),
    ]
    row = hstack(panels, gap=4)
    legend = legend_panel(
        sorted(set(gt_classes) | set(predicted_classes)), class_names, colors, row.shape[0], "classes"
    )
    return hstack([row, legend], gap=4)


def _drawn(segment_ids: np.ndarray, segments: list[dict]) -> int:
    """How many of ``segments`` have a pixel in ``segment_ids``."""
    return int(np.isin([s["id"] for s in segments], segment_ids).sum()) if segments else 0


def _segment_count(segment_ids: np.ndarray, segments: list[dict]) -> str:
    """"1 segment", "3 segments": the drawn segments, for a panel title."""
    count = _drawn(segment_ids, segments)
    return f"{count} segment" if count == 1 else f"{count} segments"


def comparison_grid(
    samples: list[dict], class_names: list[str], colors: list | None = None, min_side: int = 256
) -> np.ndarray:
    """One :func:`comparison_row` per sample, stacked; a panel saying so when there is no sample."""
    if not samples:
        return message_panel("no validation images to show", min_side, 3 * min_side)
    return vstack([comparison_row(s, class_names, colors, min_side) for s in samples], gap=8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG file content (what notebooks display: PNG only, no JPEG copy)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
