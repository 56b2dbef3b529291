"""Token re-calibration (TRC) of PRO-SCALE: gate coarse tokens with a scalar computed from the finest map.

Before PRO-SCALE's early stages, the coarse tokens (s5 at 1/32, s4 at 1/16) have not yet seen the fine
scale (s3 at 1/8). TRC injects a little of it: every coarse token is multiplied by a per-token gate

    gate = sigmoid(tau * (w . x + b)),   x = s3 bilinearly resized (align_corners=False) to the coarse grid

with ``w`` in R^C and ``b`` a scalar (one ``Linear(C, 1)``, the official ``token_excite.ops``) and the
temperature ``tau`` (0.1 in the released configs). One module serves every target level; the finest level
itself is never gated.

Layouts (``layout``):

- ``"paper"`` (default): x is the resized s3 *feature map*, so the gate of the coarse token at grid cell
  (i, j) is computed from the s3 neighbourhood that covers the same image region (for an exact 2x / 4x
  size ratio, the mean of the 2x2 / the centre 2x2 of the 4x4 s3 block under it).
- ``"released"``: the official code reinterprets the token-major (B, N, C) s3 tokens as a (B, C, H, W) map
  with a plain ``view`` (no transpose), resizes that, and reinterprets the result as (B, N_target, C) again
  with a plain reshape. The gate is then computed from a scrambled copy of s3. Official checkpoints were
  trained with it, so reproducing their outputs needs this layout; the tokens being gated are indexed
  correctly in both layouts (only the gate values differ).

The resize runs before the projection, as described in the paper; projecting first would be cheaper but
changes the arithmetic (and the FLOP count) of the released model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TRC_LAYOUTS = ("paper", "released")


class TokenRecalibration(nn.Module):
    """Per-token scalar gate of coarse tokens from the finest feature map.

    Args:
        d_model: token channels C.
        temperature: tau, multiplies the logit ``w . x + b`` before the sigmoid (0.1 released).
        layout: ``"paper"`` or ``"released"`` (see the module docstring).

    Attributes:
        linear: ``Linear(C, 1)``; the official checkpoint key is ``token_excite.ops.{weight,bias}``.

    forward(targets [(B, N_t, C)] tokens of the coarse levels, target_shapes [(H_t, W_t)],
            source (B, C, H_s, W_s) the finest map) -> [(B, N_t, C)] gated tokens.
    """

    def __init__(self, d_model: int = 256, temperature: float = 0.1, layout: str = "paper") -> None:
        super().__init__()
        if layout not in TRC_LAYOUTS:
            raise ValueError(f"TRC layout must be one of {list(TRC_LAYOUTS)}, got {layout!r}")
        self.temperature = float(temperature)
        self.layout = layout
        self.linear = nn.Linear(d_model, 1)

    def arrange(self, source: Tensor) -> Tensor:
        """The (B, C, H_s, W_s) map the gates are resized from: ``source`` itself in the paper layout, the
        official scrambled reinterpretation of its token-major memory in the released layout."""
        if self.layout == "released":
            batch, channels, height, width = source.shape
            # token-major memory read as channel-major, exactly like the official ``.view(-1, C, H, W)``
            return source.flatten(2).transpose(1, 2).reshape(batch, channels, height, width)
        return source

    def gate(self, arranged: Tensor, target_shape: tuple[int, int]) -> Tensor:
        """Gate values (B, H_t*W_t, 1) in (0, 1) for one target grid, from the source after :meth:`arrange`."""
        batch, channels = arranged.shape[:2]
        resized = F.interpolate(arranged, size=target_shape, mode="bilinear", align_corners=False)
        if self.layout == "released":
            features = resized.reshape(batch, target_shape[0] * target_shape[1], channels)
        else:
            # Contiguous so that every batch size takes the same GEMM path: Linear flattens (B, N, C) to (B*N, C),
            # a view of the transposed map only when B == 1 (a transposed-operand GEMM, 1 ulp off), a copy when
            # B > 1. Without it an image's gates depended on how many images shared its batch, so batch 2 and
            # 2 x batch 1 (DDP) could not match bitwise (tests/test_ddp.py). Free for B > 1: Linear copied anyway.
            features = resized.flatten(2).transpose(1, 2).contiguous()
        scaled = self.temperature * self.linear(features)  # (B, N, 1)
        # One sigmoid per image: torch's vectorised loop computes whole SIMD chunks with a vector exp and the
        # remainder with the scalar one (1 ulp apart), so on a tensor this small an element's value would depend
        # on where the batch puts it relative to the chunks (seen on an AMD EPYC host with N = 16 tokens).
        return torch.stack([torch.sigmoid(image) for image in scaled])

    def forward(self, targets: list[Tensor], target_shapes: list[tuple[int, int]], source: Tensor) -> list[Tensor]:
        """Gate every target level; the source is arranged once for all of them."""
        arranged = self.arrange(source)
        return [tokens * self.gate(arranged, shape) for tokens, shape in zip(targets, target_shapes)]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, layout={self.layout!r}"


__all__ = ["TRC_LAYOUTS", "TokenRecalibration"]
