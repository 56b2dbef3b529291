"""Mask2Former's encoder: 6 deformable-attention layers over the full token sequence of all 3 scales."""

from __future__ import annotations

from torch import Tensor, nn

from proscale.models.encoders.base import (
    ENCODERS,
    DeformableEncoderLayer,
    MultiScaleEncoder,
    SineLevelEmbedding,
    flatten_levels,
    reference_points_for,
    reset_deformable_encoder_parameters,
    unflatten_levels,
)


@ENCODERS.register("m2f")
class M2FEncoder(MultiScaleEncoder):
    """``MSDeformAttnTransformerEncoderOnly`` of Mask2Former.

    Args:
        d_model: token channels (256).
        num_layers: encoder layers (6).
        n_heads, n_points, dim_feedforward, dropout: layer hyperparameters (8, 4, 1024, 0.0).
        num_levels: scales consumed (3: 1/32, 1/16, 1/8).

    forward(feats [(B, C, H_l, W_l)] coarse first) -> refined maps, same shapes.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_layers: int = 6,
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.d_model = d_model
        self.num_levels = num_levels
        self.embed = SineLevelEmbedding(d_model, num_levels)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, num_levels, n_heads, n_points, dim_feedforward, dropout)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mask2Former's init: xavier-uniform on every matrix, then the deformable-attention reset."""
        reset_deformable_encoder_parameters(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"M2FEncoder expects {self.num_levels} feature maps, got {len(feats)}")
        tokens, shapes = flatten_levels(feats)
        pos = self.embed(feats)
        ref = reference_points_for(shapes, tokens.shape[0], tokens.device, tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, ref, shapes)
        return unflatten_levels(tokens, shapes)


__all__ = ["M2FEncoder"]
