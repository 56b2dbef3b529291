"""RT-M2F: RT-DETR's hybrid encoder (Zhao et al., CVPR 2024) in place of M2F's deformable encoder.

The hybrid encoder decouples intra-scale interaction from cross-scale fusion:

- AIFI (attention-based intra-scale feature interaction): one standard transformer encoder layer
  (8 heads, FFN 1024, GELU, post-norm, dropout 0) over the 1/32 tokens only, with a fixed 2-D sin-cos
  positional embedding added to queries and keys (not values).
- CCFM (CNN-based cross-scale feature fusion): a top-down FPN path then a bottom-up PAN path. Each fusion
  concatenates two maps (2C channels) and runs a CSPRep block (two 1x1 conv branches, one through 3
  RepVGG blocks (3x3 + 1x1 conv, summed), added); the top-down path first applies a 1x1 lateral conv to
  the coarser map and upsamples it; the bottom-up path downsamples with a 3x3 stride-2 conv. Every conv
  is conv (no bias) + norm + SiLU (RepVGG branches without activation before the sum).
- Outputs: C-channel maps at 1/8, 1/16, 1/32 = the PAN outputs; returned coarse first (1/32, 1/16, 1/8)
  as the encoder interface requires. The stride-4 FPN tail and mask projection of the pixel decoder stay.

Design choices:

- Input projections: RT-DETR's own 1x1 conv + BN projections are not repeated; the pixel decoder's M2F
  input projections (1x1 conv + GroupNorm to C) feed the encoder, like for every other encoder.
- Norm: ``norm="gn"`` (default) uses GroupNorm(32) like the rest of M2F's pixel decoder, so results do not
  depend on the per-device batch (segmentation trains with 1-2 large crops per GPU; RT-DETR's BN would
  need SyncBN); below C = 256 the groups keep 8 channels each (see :func:`make_norm`). ``norm="bn"``
  gives RT-DETR's BatchNorm.
- Depth/width multipliers of RT-DETR-R50 (depth 1.0 -> 3 RepVGG blocks per CSPRep, expansion 1.0).
- 2-D sin-cos embedding: channels [sin(x w), cos(x w), sin(y w), cos(y w)], w_i = 1/T^(i/(C/4)), x, y in
  integer pixels, in row-major (y, x) token order. (RT-DETR's code builds it from a (W, H)-indexed grid,
  which pairs positions with transposed tokens on non-square maps; no RT-DETR weights are imported here,
  so the geometrically correct order is used.)
- Upsampling: nearest x2 when the finer map is exactly twice the size (RT-DETR), bilinear to the size
  otherwise; a stride-2 downsampled map that does not match the coarser map's size (odd sizes, never
  for inputs padded to a multiple of 32) is resized bilinearly to it.

forward(feats: [(B, C, H_l, W_l)] coarse first) -> same shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proscale.models.encoders.base import ENCODERS, MultiScaleEncoder


def make_norm(kind: str, channels: int) -> nn.Module:
    """``"gn"``: GroupNorm with 32 groups of 8 channels at C = 256 (M2F's GroupNorm(32)); narrower models
    keep >= 8 channels per group (fewer groups) because a group of one channel over a 2x2 map normalises 4
    numbers and amplifies tiny input changes. ``"bn"``: BatchNorm2d (RT-DETR's choice)."""
    if kind == "gn":
        limit = max(1, min(32, channels // 8))
        return nn.GroupNorm(max(g for g in range(1, limit + 1) if channels % g == 0), channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"model.encoder.norm must be 'gn' or 'bn', got {kind!r}")


class ConvNormAct(nn.Sequential):
    """Conv (no bias, 'same' padding) -> norm -> SiLU (or no activation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, norm: str = "gn", act: bool = True):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding=(kernel - 1) // 2, bias=False),
            make_norm(norm, out_ch),
            nn.SiLU() if act else nn.Identity(),
        )


class RepVGGBlock(nn.Module):
    """SiLU(convnorm3x3(x) + convnorm1x1(x)), training-time form (no re-parameterisation needed here)."""

    def __init__(self, channels: int, norm: str = "gn") -> None:
        super().__init__()
        self.conv3x3 = ConvNormAct(channels, channels, 3, norm=norm, act=False)
        self.conv1x1 = ConvNormAct(channels, channels, 1, norm=norm, act=False)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3x3(x) + self.conv1x1(x))


class CSPRepLayer(nn.Module):
    """CSP block: conv3(RepVGG^n(conv1(x)) + conv2(x)); conv3 only if the hidden width differs."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int = 3, expansion: float = 1.0, norm: str = "gn"):
        super().__init__()
        hidden = int(out_ch * expansion)
        self.conv1 = ConvNormAct(in_ch, hidden, 1, norm=norm)
        self.conv2 = ConvNormAct(in_ch, hidden, 1, norm=norm)
        self.blocks = nn.Sequential(*(RepVGGBlock(hidden, norm) for _ in range(num_blocks)))
        self.conv3 = ConvNormAct(hidden, out_ch, 1, norm=norm) if hidden != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.blocks(self.conv1(x)) + self.conv2(x))


class AIFILayer(nn.Module):
    """Standard post-norm transformer encoder layer; the positional embedding goes to queries and keys.

    forward(tokens (B, N, C), pos (N, C)) -> (B, N, C)
    """

    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = nn.GELU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, tokens: Tensor, pos: Tensor) -> Tensor:
        query = tokens + pos
        attended = self.self_attn(query, query, tokens, need_weights=False)[0]
        tokens = self.norm1(tokens + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(tokens))))
        return self.norm2(tokens + self.dropout3(ffn))


class SinCosEmbedding2d(nn.Module):
    """Fixed 2-D sin-cos embedding (N = H*W row-major, C), cached per shape; C must be divisible by 4."""

    def __init__(self, d_model: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if d_model % 4:
            raise ValueError(f"RT-M2F's 2-D sin-cos embedding needs d_model divisible by 4, got {d_model}")
        self.d_model, self.temperature = d_model, temperature
        self._cache: dict[tuple, Tensor] = {}

    def forward(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (height, width, str(device), dtype, torch.is_inference_mode_enabled())
        if key not in self._cache:
            quarter = self.d_model // 4
            omega = 1.0 / self.temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
            ys, xs = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device),
                torch.arange(width, dtype=torch.float32, device=device),
                indexing="ij",
            )
            x_angles = xs.reshape(-1, 1) * omega
            y_angles = ys.reshape(-1, 1) * omega
            pos = torch.cat([x_angles.sin(), x_angles.cos(), y_angles.sin(), y_angles.cos()], dim=1)
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = pos.to(dtype)
        return self._cache[key]


def _upsample_to(x: Tensor, like: Tensor) -> Tensor:
    (h, w), (th, tw) = x.shape[-2:], like.shape[-2:]
    if th == 2 * h and tw == 2 * w:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)


def _match_size(x: Tensor, like: Tensor) -> Tensor:
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


@ENCODERS.register("rt_m2f")
class RTM2FEncoder(MultiScaleEncoder):
    """AIFI on the coarsest map + CCFM over all maps (see the module docstring).

    Args:
        d_model: channels C of every map (256).
        n_heads, dim_feedforward, dropout: AIFI layer (8, 1024, 0.0).
        num_aifi_layers: transformer layers on the coarsest map (1).
        csp_blocks: RepVGG blocks per CSPRep layer (3 = RT-DETR depth multiplier 1.0).
        expansion: CSPRep hidden width / C (1.0).
        norm: ``"gn"`` or ``"bn"`` for every conv.
        pe_temperature: sin-cos temperature (10000).
        num_levels: scales consumed (3).

    Attributes (index 0 = the fusion next to the coarsest level):
        aifi: ModuleList of :class:`AIFILayer`.
        lateral_convs, fpn_blocks: top-down path, ``num_levels - 1`` each.
        downsample_convs, pan_blocks: bottom-up path, ``num_levels - 1`` each (index 0 = finest fusion).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_aifi_layers: int = 1,
        csp_blocks: int = 3,
        expansion: float = 1.0,
        norm: str = "gn",
        pe_temperature: float = 10000.0,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"RT-M2F fuses scales and needs >= 2 levels, got num_levels={num_levels}")
        if num_aifi_layers < 1:
            raise ValueError(f"model.encoder.num_aifi_layers must be >= 1, got {num_aifi_layers}")
        make_norm(norm, d_model)  # validates ``norm`` with a clear error before building anything
        self.d_model = d_model
        self.num_levels = num_levels
        self.pos_embed = SinCosEmbedding2d(d_model, pe_temperature)
        self.aifi = nn.ModuleList(AIFILayer(d_model, n_heads, dim_feedforward, dropout) for _ in range(num_aifi_layers))
        fusions = num_levels - 1
        self.lateral_convs = nn.ModuleList(ConvNormAct(d_model, d_model, 1, norm=norm) for _ in range(fusions))
        self.fpn_blocks = nn.ModuleList(
            CSPRepLayer(2 * d_model, d_model, csp_blocks, expansion, norm) for _ in range(fusions)
        )
        self.downsample_convs = nn.ModuleList(ConvNormAct(d_model, d_model, 3, 2, norm=norm) for _ in range(fusions))
        self.pan_blocks = nn.ModuleList(
            CSPRepLayer(2 * d_model, d_model, csp_blocks, expansion, norm) for _ in range(fusions)
        )

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"RTM2FEncoder expects {self.num_levels} feature maps, got {len(feats)}")
        coarsest = feats[0]
        batch, channels, height, width = coarsest.shape
        tokens = coarsest.flatten(2).transpose(1, 2)
        pos = self.pos_embed(height, width, coarsest.device, tokens.dtype)
        for layer in self.aifi:
            tokens = layer(tokens, pos)
        coarsest = tokens.transpose(1, 2).reshape(batch, channels, height, width)

        # top-down FPN, coarse -> fine; each coarser map is replaced by its lateral-conv output
        inner = [coarsest]
        for index, finer in enumerate(feats[1:]):
            inner[-1] = self.lateral_convs[index](inner[-1])
            inner.append(self.fpn_blocks[index](torch.cat([_upsample_to(inner[-1], finer), finer], dim=1)))

        # bottom-up PAN, fine -> coarse
        outs = [inner[-1]]
        for index, coarser in enumerate(reversed(inner[:-1])):
            down = _match_size(self.downsample_convs[index](outs[-1]), coarser)
            outs.append(self.pan_blocks[index](torch.cat([down, coarser], dim=1)))
        return outs[::-1]


__all__ = ["AIFILayer", "CSPRepLayer", "RTM2FEncoder", "RepVGGBlock", "SinCosEmbedding2d"]
