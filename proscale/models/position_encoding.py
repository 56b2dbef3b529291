"""Sine positional encoding (DETR / Mask2Former ``PositionEmbeddingSine`` with normalize=True)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from proscale.models.ops.graph_capture import capturing


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine embedding of pixel positions, ``2 * num_pos_feats`` channels (y first, then x).

    Padding is ignored (every position is valid), as in Mask2Former's pixel decoder. The result depends
    only on (H, W, device, dtype), so it is cached per shape: encoders call it every forward.

    forward(x: (B, C, H, W)) -> (B, 2*num_pos_feats, H, W)
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self._cache: dict[tuple, Tensor] = {}

    def embedding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(2*num_pos_feats, H, W) embedding, computed in fp32 and cast to ``dtype``."""
        key = (height, width, str(device), dtype, torch.is_inference_mode_enabled())
        cached = None if capturing() else self._cache.get(key)
        if cached is not None:
            return cached
        eps = 1e-6
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        # Mask2Former's normalisation: cumulative index / (last index + eps) * scale (no half-pixel offset,
        # unlike Deformable DETR's variant); the HF parity test pins this.
        y = y / (height + eps) * self.scale
        x = x / (width + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[:, None] / dim_t  # (W, F)
        pos_y = y[:, None] / dim_t  # (H, F)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=2
        )
        pos = pos.permute(2, 0, 1).contiguous().to(dtype)
        if capturing():
            return pos
        if len(self._cache) > 32:
            self._cache.clear()
        self._cache[key] = pos
        return pos

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        return self.embedding(height, width, x.device, x.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
