"""Binary masks <-> COCO run-length encoding (pycocotools), JSON-ready."""

from __future__ import annotations

from typing import Any

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


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Decode COCO's compressed RLE text (pycocotools' ``rleFrString``) into run lengths, without trusting it.

    Each run is a little-endian group of 5-bit chunks (char - 48; bit 0x20 = "more chunks follow", bit 0x10 of
    the last chunk = negative); from the 4th run on, a value is stored as the difference to the run two places
    earlier. Vectorised with numpy so that checking every result of a COCO-sized file stays cheap. Raises
    ``ValueError`` for characters outside the alphabet or a truncated last run; returns int64 runs (possibly
    negative: callers check).
    """
    raw = np.frombuffer(counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts), np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    chunks = raw.astype(np.int64) - 48
    if chunks.min() < 0 or chunks.max() > 63:
        raise ValueError("characters outside the RLE alphabet ('0'..'o')")
    more = (chunks & 0x20) != 0
    if more[-1]:
        raise ValueError("the last run is cut off")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 35 bits: far more than any image has pixels
        raise ValueError("a run length is implausibly long")
    position = np.arange(raw.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chunks & 0x1F) << (5 * position), starts)
    negative = (chunks[ends] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    # undo the difference coding: runs 3, 5, 7, ... add the run two places earlier (as do 4, 6, 8, ...)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def rle_problem(rle: Any, height: int, width: int) -> str | None:
    """Why ``rle`` is not a valid COCO RLE of an ``height`` x ``width`` mask, or None when it is.

    Accepts compressed (text/bytes) and uncompressed (list) counts; the runs must be non-negative and cover
    exactly ``height * width`` pixels, which is what decoding needs.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return "segmentation must be an RLE dict with 'size' and 'counts'"
    counts = rle["counts"]
    try:
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                return "uncompressed RLE counts must be integers"
            runs = np.asarray(counts, dtype=np.int64)
        elif isinstance(counts, (str, bytes)):
            runs = rle_counts(counts)
        else:
            return f"RLE counts must be a string or a list, got {type(counts).__name__}"
    except (ValueError, OverflowError) as error:
        return f"undecodable RLE counts: {error}"
    if runs.size and runs.min() < 0:
        return "undecodable RLE counts: a negative run length"
    total = int(runs.sum())
    if total != height * width:
        return f"undecodable RLE counts: the runs cover {total} pixels, the {height}x{width} mask has {height * width}"
    return None
