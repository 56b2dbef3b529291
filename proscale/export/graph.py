"""The exported network: images -> final class and mask logits, and the checks every export makes first."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from proscale.structures import SIZE_DIVISIBILITY

# Dynamic exports accept H and W = 32 * n for n in this range (64 .. 4096 px).
MIN_BLOCKS, MAX_BLOCKS = 2, 128


class FinalOutputs(nn.Module):
    """The graph that is exported: ``images (B, 3, H, W)`` normalized, H and W multiples of 32 ->
    ``(pred_logits (B, Q, K+1), pred_masks (B, Q, H/4, W/4))`` of the last decoder layer (the auxiliary
    predictions of earlier layers are dead code in the exported graph and pruned)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images)
        return outputs["pred_logits"], outputs["pred_masks"]


def check_image_size(image_size: Sequence[int], what: str = "image_size") -> tuple[int, int]:
    """``[H, W]`` -> (H, W) ints, ValueError unless both are multiples of 32 within the exportable range."""
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two integers [H, W], got {image_size!r}") from None
    low, high = MIN_BLOCKS * SIZE_DIVISIBILITY, MAX_BLOCKS * SIZE_DIVISIBILITY
    for name, value in (("H", height), ("W", width)):
        if value % SIZE_DIVISIBILITY or not low <= value <= high:
            raise ValueError(
                f"{what}: {name}={value} must be a multiple of {SIZE_DIVISIBILITY} in [{low}, {high}] "
                f"(got {list(image_size)}); the model pads inputs to multiples of {SIZE_DIVISIBILITY}"
            )
    return height, width


def check_dynamic_trace_size(model: nn.Module, image_size: tuple[int, int]) -> None:
    """A dynamic export must trace at a size where no window count of a windowed backbone (Swin) is 1: the
    exporter specialises sizes of 1, so the program would be pinned to one window per side at that stage
    (``torch.export`` then refuses every larger input). At stride 32 with window w: at least 32 * (w + 1) px."""
    windows = [
        max(m.window_size) if isinstance(m.window_size, tuple) else int(m.window_size)
        for m in model.modules()
        if hasattr(m, "window_size") and hasattr(m, "shift_size")
    ]
    if not windows:
        return
    need = SIZE_DIVISIBILITY * (max(windows) + 1)
    if min(image_size) < need:
        raise ValueError(
            f"dynamic export of a windowed backbone (Swin, window {max(windows)}) must trace at >= {need} px per "
            f"side (>= 2 windows at stride 32), got image_size={list(image_size)}; e.g. image_size=[{need},{need}] "
            "or the default [800,1088] (the traced size does not limit the sizes the export accepts)"
        )


def example_images(image_size: tuple[int, int], batch_size: int = 1, seed: int = 0) -> Tensor:
    """A fixed random normalized batch (B, 3, H, W) to trace and verify with."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, *image_size, generator=generator)


def dynamic_shapes_spec() -> dict:
    """``torch.export`` dynamic shapes for :class:`FinalOutputs`: H and W free (multiples of 32), batch fixed."""
    blocks_h = torch.export.Dim("height_blocks", min=MIN_BLOCKS, max=MAX_BLOCKS)
    blocks_w = torch.export.Dim("width_blocks", min=MIN_BLOCKS, max=MAX_BLOCKS)
    return {"images": {2: SIZE_DIVISIBILITY * blocks_h, 3: SIZE_DIVISIBILITY * blocks_w}}


__all__ = ["FinalOutputs", "check_dynamic_trace_size", "check_image_size", "dynamic_shapes_spec", "example_images"]
