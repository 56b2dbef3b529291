"""PRO-SCALE: progressive token-length scaling of the deformable encoder (Aich et al., ICLR 2025).

M2F runs every encoder layer over the tokens of all scales. PRO-SCALE grows the sequence with depth:

    stage 1: p1 layers over the s5 tokens (1/32)            n_levels = 1
    stage 2: p2 layers over [stage-1 output, s4]  (1/16)     n_levels = 2
    stage 3: p3 layers over [stage-2 output, s3]  (1/8)      n_levels = 3  (an M2F layer)

Cost in token-layers: p1*N5 + p2*5*N5 + p3*21*N5 versus M2F's 6*21*N5.

Design choices (each matches the official ``PyramidMSDeformAttnTransformerEncoder`` unless said otherwise):

- ``schedule=[p1, p2, p3]``: non-negative ints, one per level, coarse first; the last stage must have at
  least one layer so every scale is refined and the output has all tokens. A 0 stage is skipped (its
  levels are simply appended to the next stage's input). More generally ``len(schedule)`` levels are
  supported (the deformable op takes 1-4); the pixel decoder uses 3.
- Independent weights per layer, stored as ONE flat ``layers`` ModuleList in execution order, so the
  official flat indices ``transformer.encoder.layers.{k}`` map one to one; layer k belongs to the stage
  given by the schedule (``stage_of_layer``) and was built with ``n_levels = stage + 1``.
- Positional (sine) + level embedding and reference points are built once for all tokens; stage k uses
  the prefix ``[:, :E_k]`` of them (coarse levels come first, so a stage's tokens are a prefix) and the
  first k levels of the reference points / spatial shapes. All of these are views: no copies.
- Tokens are concatenated only when a stage with layers needs them: each stage boundary costs exactly one
  ``torch.cat`` of (previous output, newly added level); consecutive empty stages are merged into one cat.
  The official code also clones stage outputs and re-splits the full sequence; we do neither.
- TRC (``trc=True``, :class:`TokenRecalibration`): gates every level except the finest from the finest
  (input) map, before the layers run. It is applied whether or not a stage is empty (as in the official
  code, where the gates are part of the token preparation). ``trc_layout="released"`` reproduces the
  official reshape; ``"paper"`` (default) is the transposed, spatially faithful version.
- Residual (``residual=True``, off in released configs): after every layer of stage k < last, add the
  (TRC-gated) projected input tokens of that stage's levels, i.e. stage 1 adds s5 and stage 2 adds
  [s5, s4]; the last stage has no residual. This is what the official code does (its stage 2 adds the
  encoder inputs, not the stage-1 outputs); the paper only says "the stage input is added back".
- Initialisation as M2F's encoder: Xavier-uniform for every matrix, then the deformable-attention
  initialisation, level embedding ~ N(0, 1).
- Everything else is an M2F layer: d 256, 8 heads, 4 points, FFN 1024, ReLU, dropout 0, post-norm.

forward(feats: [(B, C, H_l, W_l)] coarse first) -> same shapes (the stage-3 tokens split per level).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from itertools import accumulate

import torch
from torch import Tensor, nn

from proscale.models.encoders.base import (
    ENCODERS,
    DeformableEncoderLayer,
    MultiScaleEncoder,
    SineLevelEmbedding,
    reference_points_for,
    reset_deformable_encoder_parameters,
    unflatten_levels,
)
from proscale.models.encoders.trc import TokenRecalibration
from proscale.models.ops.graph_capture import spatial_size


def validate_schedule(schedule: Sequence[int], num_levels: int | None = None) -> tuple[int, ...]:
    """Check a PRO-SCALE schedule and return it as a tuple of ints; ``ValueError`` names the problem."""
    try:
        values = tuple(schedule)
    except TypeError:
        raise ValueError(f"model.encoder.schedule must be a list like [3, 3, 3], got {schedule!r}") from None
    if num_levels is not None and len(values) != num_levels:
        raise ValueError(
            f"model.encoder.schedule={list(values)} has {len(values)} entries; it needs one per level ({num_levels})"
        )
    if not 1 <= len(values) <= 4:
        raise ValueError(f"model.encoder.schedule={list(values)} must have 1 to 4 entries (one per level)")
    for value in values:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"model.encoder.schedule={list(values)} must contain integers, got {value!r}")
    values = tuple(operator.index(v) for v in values)
    if any(v < 0 for v in values):
        raise ValueError(f"model.encoder.schedule={list(values)} has a negative entry; entries must be >= 0")
    if values[-1] < 1:
        raise ValueError(
            f"model.encoder.schedule={list(values)}: the last stage needs >= 1 layer (p{len(values)} = 0), "
            "otherwise the finest scale is never refined"
        )
    return values


@ENCODERS.register("proscale")
class ProScaleEncoder(MultiScaleEncoder):
    """PRO-SCALE encoder (see the module docstring for every design choice).

    Args:
        d_model: token channels C (256).
        schedule: layers per stage, coarse first ([3, 3, 3] released; the official code default is [1, 1, 1]).
        n_heads, n_points, dim_feedforward, dropout: layer hyperparameters (8, 4, 1024, 0.0).
        num_levels: scales consumed; must equal ``len(schedule)`` (None = take it from the schedule).
        trc: token re-calibration on/off.
        trc_temperature: TRC's tau (0.1).
        trc_layout: ``"paper"`` or ``"released"``.
        residual: add each stage's input tokens back after every layer of the non-final stages.

    Attributes:
        layers: flat ModuleList of ``sum(schedule)`` :class:`DeformableEncoderLayer`.
        stage_of_layer: stage index (0-based) of every layer.
        embed: :class:`SineLevelEmbedding` (``embed.level_embed`` = official ``transformer.level_embed``).
        trc: :class:`TokenRecalibration` or None.
    """

    def __init__(
        self,
        d_model: int = 256,
        schedule: Sequence[int] = (3, 3, 3),
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_levels: int | None = None,
        trc: bool = True,
        trc_temperature: float = 0.1,
        trc_layout: str = "paper",
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.schedule = validate_schedule(schedule, num_levels)
        self.d_model = d_model
        self.num_levels = len(self.schedule)
        self.residual = bool(residual)
        if trc and self.num_levels < 2:
            raise ValueError(
                f"model.encoder.trc=true needs >= 2 levels (it gates coarse tokens from the finest map), "
                f"got schedule={list(self.schedule)} with {self.num_levels} level"
            )
        self.embed = SineLevelEmbedding(d_model, self.num_levels)
        self.stage_of_layer = [stage for stage, count in enumerate(self.schedule) for _ in range(count)]
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, stage + 1, n_heads, n_points, dim_feedforward, dropout)
            for stage in self.stage_of_layer
        )
        self.trc = TokenRecalibration(d_model, trc_temperature, trc_layout) if trc else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_deformable_encoder_parameters(self)

    def stage_layers(self, stage: int) -> list[DeformableEncoderLayer]:
        """The layers of one (0-based) stage, in execution order."""
        return [layer for layer, s in zip(self.layers, self.stage_of_layer) if s == stage]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"ProScaleEncoder expects {self.num_levels} feature maps, got {len(feats)}")
        batch = feats[0].shape[0]
        shapes = [spatial_size(f) for f in feats]
        ends = list(accumulate(h * w for h, w in shapes))  # token count of each stage (Python ints)
        pos = self.embed(feats)  # (B, S, C) for all tokens; stages use prefixes
        ref = reference_points_for(shapes, batch, feats[0].device, feats[0].dtype)  # (B, S, L, 2), a view

        # (B, H*W, C) views of every level; TRC gates all but the finest from the finest input map
        level_tokens = [f.flatten(2).transpose(1, 2) for f in feats]
        if self.trc is not None:
            level_tokens[:-1] = self.trc(level_tokens[:-1], shapes[:-1], feats[-1])

        pending: list[Tensor] = []  # token blocks not yet concatenated, coarse first
        layer_index = 0
        for stage, num_layers in enumerate(self.schedule):
            pending.append(level_tokens[stage])
            if num_layers == 0:
                continue
            tokens = pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)
            length, stage_shapes = ends[stage], shapes[: stage + 1]
            stage_pos, stage_ref = pos[:, :length], ref[:, :length, : stage + 1]
            skip = None
            if self.residual and stage < self.num_levels - 1:
                skip = level_tokens[0] if stage == 0 else torch.cat(level_tokens[: stage + 1], dim=1)
            for layer in self.layers[layer_index : layer_index + num_layers]:
                tokens = layer(tokens, stage_pos, stage_ref, stage_shapes)
                if skip is not None:
                    tokens = tokens + skip
            layer_index += num_layers
            pending = [tokens]
        return unflatten_levels(pending[0], shapes)

    def extra_repr(self) -> str:
        return f"schedule={list(self.schedule)}, residual={self.residual}"


__all__ = ["ProScaleEncoder", "validate_schedule"]
