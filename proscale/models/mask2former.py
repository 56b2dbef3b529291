"""Mask2Former: backbone -> pixel decoder (with a pluggable encoder) -> masked-attention transformer decoder.

The model takes normalized images padded to a multiple of 32 (see ``proscale.structures``) and returns raw
predictions; the loss (``proscale.models.criterion``) and inference (``proscale.models.inference``) are
separate modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from proscale.models.compute_options import (
    CHECKPOINT_PARTS,
    COMPILE_PARTS,
    CompiledParts,
    check_compiler,
    parse_parts,
    set_activation_checkpointing,
)
from proscale.models.encoders.base import MultiScaleEncoder
from proscale.models.pixel_decoder import PixelDecoder
from proscale.models.transformer_decoder import MaskedTransformerDecoder
from proscale.structures import SIZE_DIVISIBILITY


class Mask2Former(nn.Module):
    """Mask2Former with injected backbone and encoder.

    Args:
        backbone: returns ``{"res2".."res5"}`` maps and declares ``out_channels`` (see ``backbones.py``).
        encoder: the multi-scale encoder inside the pixel decoder (``ENCODERS``; ``d_model == conv_dim``).
        num_classes: K, classes without "no object".
        conv_dim, mask_dim, lpe: pixel decoder channels / mask-feature channels / light pixel embedding.
        num_queries, dec_layers, hidden_dim, dim_feedforward, nheads: transformer decoder (100, 9, 256, 2048, 8).
        compile: ``torch.compile`` the ``backbone`` / ``encoder`` / ``decoder`` (true = all, or a list); a part
            that cannot compile runs eagerly with a warning (``proscale/models/compute_options.py``).
        checkpointing: activation checkpointing of the ``encoder`` and/or ``decoder`` layers (true = both).

    forward(images (B, 3, H, W), normalized, H and W multiples of 32) ->
        {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4),
         "aux_outputs": [dec_layers dicts of the two above, from the learnable queries and layers 1..8]}
    """

    def __init__(
        self,
        backbone: nn.Module,
        encoder: MultiScaleEncoder,
        num_classes: int,
        conv_dim: int = 256,
        mask_dim: int = 256,
        lpe: bool = False,
        num_queries: int = 100,
        dec_layers: int = 9,
        hidden_dim: int = 256,
        dim_feedforward: int = 2048,
        nheads: int = 8,
        compile: Any = False,
        checkpointing: Any = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.pixel_decoder = PixelDecoder(backbone.out_channels, encoder, conv_dim=conv_dim, mask_dim=mask_dim, lpe=lpe)
        self.transformer_decoder = MaskedTransformerDecoder(
            in_channels=conv_dim,
            num_classes=num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            nheads=nheads,
            dim_feedforward=dim_feedforward,
            dec_layers=dec_layers,
            mask_dim=mask_dim,
        )
        set_activation_checkpointing(self, parse_parts(checkpointing, CHECKPOINT_PARTS, "model.checkpointing"))
        compile_parts = parse_parts(compile, COMPILE_PARTS, "model.compile")
        if compile_parts:
            # fail at build time, with a clear message, when there is no working compiler for the device it will use
            check_compiler("cuda" if torch.cuda.is_available() else "cpu")
        self._parts = CompiledParts(compile_parts)

    def forward(self, images: Tensor) -> dict:
        check_images(images)
        run = self._parts  # plain call of each part, or its compiled version (model.compile)
        features = run("backbone", self.backbone, images)
        pixels = self.pixel_decoder(features, lambda feats: run("encoder", self.pixel_decoder.encoder, feats))
        return run("decoder", self.transformer_decoder, pixels.multi_scale_features, pixels.mask_features)

    def __getstate__(self) -> dict:
        # compiled graphs are per process and not copyable: a copy (EMA, spawn) compiles again on first use
        state = dict(super().__getstate__())
        state["_parts"] = CompiledParts(state["_parts"].parts, **state["_parts"].options)
        return state


def check_images(images: Tensor, channels: int = 3) -> None:
    """Raise ValueError unless ``images`` is (B, channels, H, W) with H, W >= 32 and multiples of 32."""
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D (B, {channels}, H, W) tensor, got shape {tuple(images.shape)}")
    _, got_channels, height, width = images.shape
    if got_channels != channels:
        raise ValueError(f"images must have {channels} channels (RGB), got {got_channels} in {tuple(images.shape)}")
    if height < SIZE_DIVISIBILITY or width < SIZE_DIVISIBILITY:
        raise ValueError(f"images must be at least {SIZE_DIVISIBILITY}x{SIZE_DIVISIBILITY} px, got {height}x{width}")
    if height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of {SIZE_DIVISIBILITY}: "
            f"pad to a multiple of {SIZE_DIVISIBILITY} (e.g. zero-pad bottom/right)"
        )


__all__ = ["Mask2Former", "check_images"]
