"""Augmentations applied jointly to an image and its label maps (the paper's recipes).

A :class:`Sample` carries the image (H, W, 3) uint8 and any number of label maps shaped (..., H, W)
(a panoptic id map, a semantic map, a stack of instance masks), each with the value used where the map
has to be padded. Every transform moves image and maps with the same geometry: images are resized
bilinearly, label maps with nearest neighbour using the same pixel-centre convention, so a pixel keeps
its label. Padding is not materialised here: a transform that "pads to" a size records it in
``Sample.pad_to`` and the collate pads (image with zeros after normalisation, masks with False), keeping
the valid region in ``batch["image_sizes"]``.

Recipes (Mask2Former / the paper), all sizes configurable so CPU presets can shrink them::

    COCO train (LSJ):   RandomFlip, ResizeScale(0.1, 2.0, 1024), FixedSizeCrop(1024)
    COCO test:          ResizeShortestEdge(800, max_size=1333)
    Cityscapes train:   ResizeShortestEdge([512..2048], max_size=4096), RandomCrop((512, 1024)), ColorAugSSD,
                        RandomFlip
    ADE20K train:       ResizeShortestEdge([256..1024], max_size=2048), RandomCrop(512), ColorAugSSD, RandomFlip

:class:`ColorAugSSD` (Mask2Former's ``INPUT.COLOR_AUG_SSD`` for ADE20K and Cityscapes) is the only photometric
one: it changes the image's colours and leaves every label map as it is.

Randomness comes from torch's global generator, which the DataLoader seeds per worker (and Lightning's
``seed_everything(workers=True)`` makes reproducible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


@dataclass
class Sample:
    """Image (H, W, 3) uint8 + label maps (..., H, W) + their pad values + the size to pad to (or None)."""

    image: np.ndarray
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    fills: dict[str, int] = field(default_factory=dict)
    pad_to: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, ()))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (PIL, pixel-centre aligned)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) any dtype -> (..., h, w), nearest neighbour with PIL's convention src = floor((dst+0.5)*H/h)."""
    in_h, in_w = labels.shape[-2:]
    if (in_h, in_w) == tuple(size):
        return labels
    rows = np.minimum(((np.arange(size[0]) + 0.5) * in_h / size[0]).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * in_w / size[1]).astype(np.int64), in_w - 1)
    return labels[..., rows[:, None], cols[None, :]]


def _resize(sample: Sample, size: tuple[int, int]) -> Sample:
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"resize target {size} is empty (input {sample.size})")
    old = sample.size
    sample.image = resize_image(sample.image, size)
    sample.maps = {k: resize_nearest(v, size) for k, v in sample.maps.items()}
    if sample.pad_to is not None:  # keep the padded canvas proportional
        sample.pad_to = (round(sample.pad_to[0] * size[0] / old[0]), round(sample.pad_to[1] * size[1] / old[1]))
    return sample


def _crop(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    sample.image = np.ascontiguousarray(sample.image[top : top + height, left : left + width])
    sample.maps = {
        k: np.ascontiguousarray(v[..., top : top + height, left : left + width]) for k, v in sample.maps.items()
    }
    return sample


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected a size (h, w) or an int, got {size}")
    return size


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms or [])

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) < self.prob:
            sample.image = np.ascontiguousarray(sample.image[:, ::-1])
            sample.maps = {k: np.ascontiguousarray(v[..., ::-1]) for k, v in sample.maps.items()}
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class ResizeScale:
    """LSJ resize: scale s ~ U(min_scale, max_scale); fit the image inside (s * target_h, s * target_w)."""

    def __init__(self, min_scale: float = 0.1, max_scale: float = 2.0, target_size: int | Sequence[int] = 1024) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"ResizeScale needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale = min_scale, max_scale
        self.target_size = _pair(target_size)

    def __call__(self, sample: Sample) -> Sample:
        scale = _uniform(self.min_scale, self.max_scale)
        h, w = sample.size
        factor = min(scale * self.target_size[0] / h, scale * self.target_size[1] / w)
        return _resize(sample, (max(1, round(h * factor)), max(1, round(w * factor))))

    def __repr__(self) -> str:
        return f"ResizeScale({self.min_scale}, {self.max_scale}, {self.target_size})"


class FixedSizeCrop:
    """LSJ crop: random crop to at most ``crop_size``, then (if ``pad``) pad to exactly ``crop_size``."""

    def __init__(self, crop_size: int | Sequence[int] = 1024, pad: bool = True) -> None:
        self.crop_size = _pair(crop_size)
        self.pad = pad

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample.size
        crop_h, crop_w = min(h, self.crop_size[0]), min(w, self.crop_size[1])
        top, left = _randint(h - crop_h), _randint(w - crop_w)
        sample = _crop(sample, top, left, crop_h, crop_w)
        if self.pad:
            sample.pad_to = self.crop_size
        return sample

    def __repr__(self) -> str:
        return f"FixedSizeCrop({self.crop_size}, pad={self.pad})"


RandomCrop = FixedSizeCrop
"""Cityscapes (512, 1024) / ADE20K 512 "absolute" random crop: the same operation as the LSJ crop."""


class ColorAugSSD:
    """SSD-style colour distortion (Mask2Former's ``COLOR_AUG_SSD``, on for ADE20K and Cityscapes). Image only.

    Brightness first, then contrast either before or after saturation + hue (a coin flip); each of the four
    is applied with probability 1/2 and the image is clipped to [0, 255] after each:

    - brightness: add U(-brightness_delta, +brightness_delta) to every channel;
    - contrast: multiply by U(contrast_low, contrast_high);
    - saturation: multiply HSV saturation by U(saturation_low, saturation_high);
    - hue: shift the HSV hue by an integer U{-hue_delta..+hue_delta} in OpenCV units (180 per turn,
      so 18 = 36 degrees).

    HSV is computed in float (no 8-bit rounding of H, S, V between the steps); the result is uint8.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_low: float = 0.5,
        contrast_high: float = 1.5,
        saturation_low: float = 0.5,
        saturation_high: float = 1.5,
        hue_delta: int = 18,
    ) -> None:
        for name, low, high in (
            ("contrast", contrast_low, contrast_high),
            ("saturation", saturation_low, saturation_high),
        ):
            if not 0 <= low <= high:
                raise ValueError(f"ColorAugSSD needs 0 <= {name}_low <= {name}_high, got {low}, {high}")
        if brightness_delta < 0 or not 0 <= hue_delta <= 180:
            raise ValueError(
                f"ColorAugSSD needs brightness_delta >= 0 and 0 <= hue_delta <= 180, got {brightness_delta}, {hue_delta}"
            )
        self.brightness_delta = float(brightness_delta)
        self.contrast = (float(contrast_low), float(contrast_high))
        self.saturation = (float(saturation_low), float(saturation_high))
        self.hue_delta = int(hue_delta)

    @staticmethod
    def _coin() -> bool:
        return float(torch.rand(())) < 0.5

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        if self._coin():
            image = np.clip(image * _uniform(*self.contrast), 0, 255)
        return image

    def _saturation_and_hue(self, image: np.ndarray) -> np.ndarray:
        saturation = _uniform(*self.saturation) if self._coin() else None
        hue = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ())) if self._coin() else None
        if saturation is None and hue is None:
            return image
        from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

        hsv = rgb_to_hsv(image / 255.0)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 1)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue / 180.0) % 1.0
        return np.clip(hsv_to_rgb(hsv) * 255.0, 0, 255)

    def __call__(self, sample: Sample) -> Sample:
        image = sample.image.astype(np.float32)
        if self._coin():
            image = np.clip(image + _uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        if self._coin():
            image = self._saturation_and_hue(self._contrast(image))
        else:
            image = self._contrast(self._saturation_and_hue(image))
        sample.image = np.rint(image).astype(np.uint8)
        return sample

    def __repr__(self) -> str:
        return (
            f"ColorAugSSD(brightness_delta={self.brightness_delta}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue_delta={self.hue_delta})"
        )


class ResizeShortestEdge:
    """Resize so the short side is ``short_edge`` (or one drawn from a list), the long side <= ``max_size``.

    ``short_edge`` may be an int (test time: 800 for COCO) or a list; with ``sample_style="choice"`` one
    value is picked, with ``"range"`` an integer is drawn uniformly between the list's two ends.
    """

    def __init__(
        self, short_edge: int | Sequence[int] = 800, max_size: int = 1333, sample_style: str = "choice"
    ) -> None:
        self.short_edges = [int(short_edge)] if isinstance(short_edge, int) else [int(s) for s in short_edge]
        if not self.short_edges or min(self.short_edges) < 1:
            raise ValueError(f"ResizeShortestEdge: short_edge must be positive, got {short_edge}")
        if sample_style not in ("choice", "range"):
            raise ValueError(f"ResizeShortestEdge: sample_style must be 'choice' or 'range', got {sample_style!r}")
        self.max_size, self.sample_style = max_size, sample_style

    @staticmethod
    def output_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
        scale = short / min(h, w)
        new_h, new_w = h * scale, w * scale
        if max(new_h, new_w) > max_size:
            shrink = max_size / max(new_h, new_w)
            new_h, new_w = new_h * shrink, new_w * shrink
        return int(new_h + 0.5), int(new_w + 0.5)

    def __call__(self, sample: Sample) -> Sample:
        if self.sample_style == "range":
            low, high = min(self.short_edges), max(self.short_edges)
            short = low + _randint(high - low)
        else:
            short = self.short_edges[_randint(len(self.short_edges) - 1)]
        return _resize(sample, self.output_size(*sample.size, short, self.max_size))

    def __repr__(self) -> str:
        return f"ResizeShortestEdge({self.short_edges}, max_size={self.max_size}, {self.sample_style})"


def scale_list(base: int, low: float = 0.5, high: float = 2.0, step: float = 0.1) -> list[int]:
    """Mask2Former's multi-scale short-edge list, e.g. ``scale_list(512)`` -> [256, 307, ..., 1024]."""
    count = round((high - low) / step)
    return [int(base * (low + i * step)) for i in range(count + 1)]
