"""Measured milliseconds next to GFLOPs: the optional ``--speed`` columns of the compute table.

Timing follows :mod:`proscale.analysis.speed` (median of repeated runs after warm-up, CUDA synchronized),
on a real model with random weights in eval mode, batch 1, no autograd:

- ``encoder_ms``: ``model.pixel_decoder`` on precomputed backbone features (the paper's "encoder" plus the
  1x1 mask projection, which is ~3 % of it);
- ``forward_ms``: the whole ``model(images)`` forward (without post-processing).
"""

from __future__ import annotations

import torch
from torch import nn


def measured_ms(
    model: nn.Module,
    image_size: tuple[int, int],
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 3,
) -> dict[str, float]:
    """``{"encoder_ms", "forward_ms"}`` per image for ``model`` at the padded ``image_size`` (H, W)."""
    from proscale.analysis.speed import time_fn

    model = model.to(device).eval()
    images = torch.randn(1, 3, *image_size, device=device)
    with torch.no_grad():
        features = model.backbone(images)
        encoder = time_fn(lambda: model.pixel_decoder(features), warmup=warmup, repeats=repeats, device=device)
        forward = time_fn(lambda: model(images), warmup=warmup, repeats=repeats, device=device)
    return {"encoder_ms": encoder.per_image_ms, "forward_ms": forward.per_image_ms}
