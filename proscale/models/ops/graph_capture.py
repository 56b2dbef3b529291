"""Shapes and caches while a graph is captured (``torch.export``, the dynamo ONNX exporter, ``torch.compile``).

The model keeps spatial shapes as Python ints and caches shape-dependent tables (sine embeddings, reference
points) so eager forwards never sync or recompute. A capture with dynamic sizes sees ``SymInt`` sizes instead:
``int()`` would pin them to the example's value (the export then refuses every other size) and a dict keyed by
them cannot be looked up. These two helpers keep eager behaviour unchanged and keep sizes symbolic in a capture.
"""

from __future__ import annotations

import torch
from torch import Tensor


def capturing() -> bool:
    """True while ``torch.export`` / ``torch.compile`` traces the forward (shape caches must be bypassed)."""
    return torch.compiler.is_compiling()


def spatial_size(feature: Tensor) -> tuple[int, int]:
    """(H, W) of a (..., H, W) tensor: Python ints in eager mode, symbolic sizes during a capture."""
    height, width = feature.shape[-2:]
    if capturing():
        return height, width
    return int(height), int(width)


def sizes_tensor(shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
    """(L, 2) tensor of (W_l, H_l) per level, dtype/device of ``like``; symbolic sizes stay symbolic in a
    capture (a tensor constructor would pin them)."""
    if not capturing():
        return like.new_tensor([[w, h] for h, w in shapes])
    one = like.new_ones(())
    return torch.stack([torch.stack((one * w, one * h)) for h, w in shapes])


__all__ = ["capturing", "sizes_tensor", "spatial_size"]
