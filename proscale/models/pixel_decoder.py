"""Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``) around a pluggable multi-scale encoder.

    res5, res4, res3 --input_proj (1x1 conv + GN)--> [s5, s4, s3] --encoder--> [e5, e4, e3]
    res2 --adapter_1 (1x1 conv, no bias + GN)--> + bilinear-upsampled e3 --layer_1--> y (1/4)
    mask_features = 1x1 conv(y)

``layer_1`` is a 3x3 conv (no bias) + GN + ReLU, or with ``lpe=True`` (PRO-SCALE's light pixel embedding) a
3x3 stride-1 max-pool + GN + ReLU. The encoder (any ``MultiScaleEncoder``) is the only part that differs
between M2F, PRO-SCALE, RT-M2F and Lite-M2F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proscale.models.encoders.base import MultiScaleEncoder

ENCODER_INPUTS = ("res5", "res4", "res3")  # coarse first, the order of ``input_proj``


@dataclass
class PixelDecoderOutput:
    """What the pixel decoder hands to the transformer decoder.

    mask_features: (B, mask_dim, H/4, W/4), dotted with the query embeddings to give mask logits.
    multi_scale_features: [(B, conv_dim, H/32, W/32), (B, conv_dim, H/16, W/16), (B, conv_dim, H/8, W/8)],
        the encoder outputs, coarse first; the masked-attention layers cycle through them.
    """

    mask_features: Tensor
    multi_scale_features: list[Tensor]


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" as detectron2 uses it: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)


class PixelDecoder(nn.Module):
    """Input projections + encoder + stride-4 FPN tail + mask projection.

    Args:
        in_channels: backbone channels per feature, keys ``res2..res5``.
        encoder: the multi-scale encoder (``d_model`` must equal ``conv_dim``, 3 levels).
        conv_dim: channels inside the decoder (256; a multiple of 32 for GroupNorm(32)).
        mask_dim: channels of ``mask_features`` (256).
        lpe: replace ``layer_1``'s 3x3 conv by a 3x3 stride-1 max-pool.

    forward(features {"res2".."res5": (B, C_k, H/s_k, W/s_k)}) -> :class:`PixelDecoderOutput`
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        encoder: MultiScaleEncoder,
        conv_dim: int = 256,
        mask_dim: int = 256,
        lpe: bool = False,
    ) -> None:
        super().__init__()
        missing = [k for k in (*ENCODER_INPUTS, "res2") if k not in in_channels]
        if missing:
            raise ValueError(f"PixelDecoder needs backbone features res2..res5; missing {missing}")
        if conv_dim % 32 != 0:
            raise ValueError(f"conv_dim must be a multiple of 32 (GroupNorm(32)), got {conv_dim}")
        if getattr(encoder, "d_model", conv_dim) != conv_dim:
            raise ValueError(f"encoder d_model ({encoder.d_model}) must equal the pixel decoder conv_dim ({conv_dim})")
        if getattr(encoder, "num_levels", 3) != 3:
            raise ValueError(f"the pixel decoder feeds 3 levels to the encoder, it has num_levels={encoder.num_levels}")
        self.conv_dim, self.mask_dim, self.lpe = conv_dim, mask_dim, lpe
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for name in ENCODER_INPUTS
        )
        self.encoder = encoder
        self.adapter_1 = nn.Sequential(
            nn.Conv2d(in_channels["res2"], conv_dim, kernel_size=1, bias=False), nn.GroupNorm(32, conv_dim)
        )
        if lpe:
            smoothing: nn.Module = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        else:
            smoothing = nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False)
        self.layer_1 = nn.Sequential(smoothing, nn.GroupNorm(32, conv_dim), nn.ReLU())
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mask2Former's init: xavier for the input projections, c2_xavier_fill for the FPN tail."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        c2_xavier_fill(self.adapter_1[0])
        if not self.lpe:
            c2_xavier_fill(self.layer_1[0])
        c2_xavier_fill(self.mask_features)

    def forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        device_type = features["res5"].device.type
        # meta tensors (compute analysis) never run under autocast, and torch raises when asked about them
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            # the original runs the whole pixel decoder in fp32 (deformable sampling is not half-safe)
            with torch.autocast(device_type=device_type, enabled=False):
                return self._forward({k: v.float() for k, v in features.items()})
        return self._forward(features)

    def _forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        projected = [proj(features[name]) for proj, name in zip(self.input_proj, ENCODER_INPUTS)]
        encoded = self.encoder(projected)
        lateral = self.adapter_1(features["res2"])
        upsampled = F.interpolate(encoded[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fine = self.layer_1(lateral + upsampled)
        return PixelDecoderOutput(mask_features=self.mask_features(fine), multi_scale_features=list(encoded))


__all__ = ["PixelDecoder", "PixelDecoderOutput", "c2_xavier_fill"]
