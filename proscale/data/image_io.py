"""Reading images and label PNGs from disk, with errors that name the file and the problem.

Images are returned as RGB ``uint8`` arrays (H, W, 3) with the EXIF orientation applied, as detectron2's
``read_image`` (and hence the original Mask2Former) does: COCO's width/height and its annotations are in
the orientation a viewer shows, so the pixels are rotated to match and the annotation PNGs (which carry no
EXIF) are read as stored. Grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit images are
converted to 8-bit RGB.

Panoptic PNGs encode a segment id per pixel as ``id = R + 256 * G + 256**2 * B`` (COCO panoptic format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly instead of being decoded with a grey tail.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file is missing")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot decode {what} (corrupt or truncated file): {error}") from error
    return image


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: rescale to 8 bit instead of PIL's clipping conversion.
        gray = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or gray.max() > 255 else 255.0
        gray = np.clip(gray / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: cannot convert image mode {mode!r} to RGB: {error}") from error
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), EXIF orientation applied.

    Raises ``ValueError`` naming the file if it is missing, corrupt or truncated.
    """
    image = _open(path, "image")
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:  # a broken EXIF block: the pixels are still fine
        raise ValueError(f"{path}: cannot apply EXIF orientation: {error}") from error
    return _to_rgb(image, Path(path))


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 segment ids, ``R + 256 G + 256^2 B``."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an RGB-encoded panoptic map must be (H, W, 3), got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer segment ids -> (H, W, 3) uint8, inverse of :func:`rgb_to_id`."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"segment ids must lie in [0, 2**24) to be RGB-encoded, got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a COCO-format panoptic PNG -> (H, W) int64 segment ids (0 = void).

    The file must be 8-bit RGB (an alpha channel that is fully opaque is accepted); anything else
    (palette, grayscale) cannot hold RGB-encoded ids and raises ``ValueError`` naming the file.
    """
    image = _open(path, "panoptic PNG")
    if image.mode == "RGBA":
        array = np.asarray(image)
        if (array[..., 3] != 255).any():
            raise ValueError(f"{path}: panoptic PNG has a non-opaque alpha channel; expected RGB-encoded ids")
        return rgb_to_id(array[..., :3])
    if image.mode != "RGB":
        raise ValueError(f"{path}: panoptic PNG must be RGB (ids = R + 256 G + 256^2 B), got mode {image.mode!r}")
    return rgb_to_id(np.asarray(image))


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG (semantic class per pixel) -> (H, W) int64.

    Raises ``ValueError`` naming the file for a multi-channel image (an RGB colour map is not a label map).
    """
    image = _open(path, "label PNG")
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"{path}: label PNG must be single-channel (L/P/I), got mode {image.mode!r}")
    return np.asarray(image).astype(np.int64)
