"""Binary masks <-> COCO run-length encoding (pycocotools), JSON-ready."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """(N, H, W) bool masks -> N COCO RLEs ``{"size": [H, W], "counts": str}`` (compressed counts as text).

    pycocotools wants a Fortran-ordered (H, W, N) uint8 array; a C-contiguous (N, W, H) array has exactly that
    memory layout, so one transposed copy replaces N per-mask Fortran copies.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().to("cpu", torch.uint8).numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks expects (N, H, W) masks, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    fortran_hwn = np.ascontiguousarray(masks.astype(np.uint8, copy=False).transpose(0, 2, 1)).transpose(2, 1, 0)
    rles = mask_utils.encode(fortran_hwn)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed text/bytes counts, or uncompressed list counts) -> (H, W) bool."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def rle_area(rle: dict) -> int:
    """Pixel count of a compressed RLE (text or bytes counts)."""
    if isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(rle))
