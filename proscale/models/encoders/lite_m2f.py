"""Lite-M2F: Lite-DETR's interleaved multi-scale encoder (Li et al., CVPR 2023) in place of M2F's encoder.

Lite-DETR splits the tokens into high-level (small, coarse maps) and low-level (the large map) ones.
Most layers update only the high-level tokens, whose queries still sample all scales (keys/values are the
full multi-scale sequence); periodically one layer updates all tokens. The low-level tokens, ~76 % of the
sequence, are therefore refined only a few times, which is where the savings come from.

Design choices:

- High-level tokens = the ``num_high_levels`` coarsest maps (default 2: 1/32 and 1/16). Our levels are
  ordered coarse first, so they are a prefix of the sequence and a high-level update is a
  :class:`DeformableEncoderLayer` run with ``num_queries = N5 + N4`` (positional embedding and
  reference points are the prefix too); the low-level (1/8) tokens pass through unchanged (the layer
  re-concatenates them behind the updated prefix, one copy per layer, as Lite-DETR does; the value
  projection needs the full sequence in every layer anyway).
- Schedule in Lite-DETR's "(A+1)xB" notation: ``num_blocks`` (B) blocks of ``high_level_updates`` (A)
  high-level updates followed by one all-token update. Default (2+1)x2 = 6 layers, the same depth as M2F,
  i.e. ``H H A H H A``: every block ends with an all-token update so the 1/8 map leaving the encoder is
  refined by the last layer. (The released Lite-DINO code also uses 6 encoder layers with the all-token
  layer at the end of each block, ``(layer + 1) % (6 / blocks) == 0``.)
- Plain deformable attention, not Lite-DETR's key-aware variant (KDA): the project has one deformable op
  for every encoder, and Lite-DETR's README notes KDA can be switched off without much loss.
- Every layer has its own weights and is a standard M2F layer with 3 levels (d 256, 8 heads, 4 points,
  FFN 1024, ReLU, dropout 0, post-norm); embeddings and initialisation as M2F's encoder.

forward(feats: [(B, C, H_l, W_l)] coarse first) -> same shapes.
"""

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


@ENCODERS.register("lite_m2f")
class LiteM2FEncoder(MultiScaleEncoder):
    """Interleaved high-level / all-level deformable encoder.

    Args:
        d_model: token channels C (256).
        num_blocks: B, blocks of (A high-level updates + 1 all-token update) (2).
        high_level_updates: A, high-level-only layers per block (2).
        num_high_levels: coarsest levels treated as high-level (2: 1/32 and 1/16).
        n_heads, n_points, dim_feedforward, dropout: layer hyperparameters (8, 4, 1024, 0.0).
        num_levels: scales consumed (3).

    Attributes:
        layers: flat ModuleList of ``num_blocks * (high_level_updates + 1)`` layers, execution order.
        updates_all: per layer, True if it updates every token (else only the high-level prefix).
    """

    def __init__(
        self,
        d_model: int = 256,
        num_blocks: int = 2,
        high_level_updates: int = 2,
        num_high_levels: int = 2,
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"model.encoder.num_blocks must be >= 1, got {num_blocks}")
        if high_level_updates < 0:
            raise ValueError(f"model.encoder.high_level_updates must be >= 0, got {high_level_updates}")
        if not 1 <= num_high_levels < num_levels:
            raise ValueError(
                f"model.encoder.num_high_levels must be in [1, num_levels - 1] = [1, {num_levels - 1}], "
                f"got {num_high_levels}"
            )
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_high_levels = num_high_levels
        self.updates_all = [
            step == high_level_updates for _ in range(num_blocks) for step in range(high_level_updates + 1)
        ]
        self.embed = SineLevelEmbedding(d_model, num_levels)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, num_levels, n_heads, n_points, dim_feedforward, dropout)
            for _ in self.updates_all
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_deformable_encoder_parameters(self)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"LiteM2FEncoder expects {self.num_levels} feature maps, got {len(feats)}")
        tokens, shapes = flatten_levels(feats)
        pos = self.embed(feats)
        ref = reference_points_for(shapes, tokens.shape[0], tokens.device, tokens.dtype)
        num_high = sum(h * w for h, w in shapes[: self.num_high_levels])
        for layer, updates_all in zip(self.layers, self.updates_all):
            tokens = layer(tokens, pos, ref, shapes, num_queries=None if updates_all else num_high)
        return unflatten_levels(tokens, shapes)

    def extra_repr(self) -> str:
        pattern = "".join("A" if full else "H" for full in self.updates_all)
        return f"pattern={pattern}, num_high_levels={self.num_high_levels}"


__all__ = ["LiteM2FEncoder"]
