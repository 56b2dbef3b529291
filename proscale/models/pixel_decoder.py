"""Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``) around a pluggable multi-scale encoder.

    res5, res4, res3 --input_proj (1x1 conv + GN)--> [s5, s4, s3] --encoder--> [e5, e4, e3]
    res2 --adapter_1 (1x1 conv, no bias + GN)--> + bilinear-upsampled e3 --layer_1--> y (1/4)
    mask_features = 1x1 conv(y)

``layer_1`` is a 3x3 conv (no bias) + GN + ReLU, or with ``lpe=True`` (PRO-SCALE's light pixel embedding) a
3x3 stride-1 max-pool + GN + ReLU. The encoder (any ``MultiScaleEncoder``) is the only part that differs
between M2F, PRO-SCALE, RT-M2F and Lite-M2F.

Inference fast path (CPU, fp32/fp64, nothing needs a gradient): the 1x1 convolutions run as plain GEMMs,
the GroupNorms in place, and the whole stride-4 tail (adapter GN + upsample-add + max-pool/conv + GN +
ReLU, then the mask projection) in place in one buffer (:mod:`proscale.models.ops.fpn_tail`). Same
function, same parameters and state-dict keys; training (autograd recording) runs the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proscale.models.encoders.base import MultiScaleEncoder
from proscale.models.ops.fpn_tail import conv1x1, conv1x1_, conv1x1_group_norm, fpn_tail
from proscale.models.ops.inference_gate import fast_inference_allowed

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


class LightPixelEmbedding(nn.MaxPool2d):
    """PRO-SCALE's LPE smoothing: ``MaxPool2d(3, stride=1, padding=1)``, same values and gradients.

    On CPU, PyTorch's max-pool kernel is pathologically slow for a contiguous (NCHW) map at stride 1 (an
    (8, 64, 32, 40) map: ~28 ms vs ~2.5 ms channels-last, 1 thread), so there the pool runs on a channels-last
    copy and the result is returned contiguous.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


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
            smoothing: nn.Module = LightPixelEmbedding()
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

    def forward(self, features: dict[str, Tensor], encoder: Callable | None = None) -> PixelDecoderOutput:
        """``encoder``: what to call instead of ``self.encoder`` (its compiled version, ``model.compile``)."""
        device_type = features["res5"].device.type
        # meta tensors (compute analysis) never run under autocast, and torch raises when asked about them
        if device_type != "meta" and torch.is_autocast_enabled(device_type):
            # the original runs the whole pixel decoder in fp32 (deformable sampling is not half-safe)
            with torch.autocast(device_type=device_type, enabled=False):
                return self._forward({k: v.float() for k, v in features.items()}, encoder)
        return self._forward(features, encoder)

    def _forward(self, features: dict[str, Tensor], encoder: Callable | None = None) -> PixelDecoderOutput:
        fast = self._fast_path_applies(features["res2"])
        encoded = (encoder or self.encoder)(self.project_inputs(features, fast))
        mask_features = self.stride4_features(features["res2"], encoded[-1], fast)
        return PixelDecoderOutput(mask_features=mask_features, multi_scale_features=list(encoded))

    def project_inputs(self, features: dict[str, Tensor], fast: bool = False) -> list[Tensor]:
        """``input_proj``: res5, res4, res3 -> [s5, s4, s3], each (B, conv_dim, H_l, W_l), coarse first.
        ``fast`` (when :meth:`_fast_path_applies`): each 1x1 conv as one GEMM, GroupNorm in place."""
        if fast:
            return [conv1x1_group_norm(features[name], *proj) for proj, name in zip(self.input_proj, ENCODER_INPUTS)]
        return [proj(features[name]) for proj, name in zip(self.input_proj, ENCODER_INPUTS)]

    def stride4_features(self, res2: Tensor, coarse: Tensor, fast: bool = False) -> Tensor:
        """The FPN tail + mask projection: res2 (B, C2, H/4, W/4) and the finest encoder output ``coarse``
        (B, conv_dim, H/8, W/8) -> mask features (B, mask_dim, H/4, W/4)."""
        if fast and self._fast_tail_applies(res2, coarse):
            fine = fpn_tail(res2, coarse, self.adapter_1, self.layer_1)
            if self.mask_features.in_channels == self.mask_features.out_channels:
                # ``fine`` is a buffer of our own, used by nothing else: project it in place
                return conv1x1_(fine, self.mask_features)
        else:
            lateral = self.adapter_1(res2)
            # the encoder output is a channels-last view: the bilinear kernel is ~4x faster on a contiguous map
            upsampled = F.interpolate(
                coarse.contiguous(), size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            fine = self.layer_1(lateral + upsampled)
        return conv1x1(fine, self.mask_features) if fast else self.mask_features(fine)

    def _fast_path_applies(self, res2: Tensor) -> bool:
        """Whether the inference fast paths (:mod:`proscale.models.ops.fpn_tail`: in place, no autograd) may
        replace the 1x1 convolutions + GroupNorms of ``input_proj`` and ``mask_features``: fp32/fp64, standard
        modules, and :func:`fast_inference_allowed` (CPU, nothing needs a gradient, nobody observes the modules:
        no hooks, no dispatch mode)."""
        if res2.dtype not in (torch.float32, torch.float64) or not fast_inference_allowed(self, res2):
            return False
        return all(
            len(proj) == 2 and _is_plain_conv1x1(proj[0]) and type(proj[1]) is nn.GroupNorm for proj in self.input_proj
        ) and _is_plain_conv1x1(self.mask_features)

    def _fast_tail_applies(self, res2: Tensor, coarse: Tensor) -> bool:
        """Whether :func:`~proscale.models.ops.fpn_tail.fpn_tail` may run the tail (given that
        :meth:`_fast_path_applies`): the tail modules are the standard ones this file builds, unobserved."""
        if coarse.dtype != res2.dtype or coarse.requires_grad:
            return False
        conv, norm_in = self.adapter_1
        smooth, norm_out, act = self.layer_1
        standard_adapter = (
            _is_plain_conv1x1(conv)
            and type(norm_in) is nn.GroupNorm
            and type(norm_out) is nn.GroupNorm
            and type(act) is nn.ReLU
            and norm_in.num_channels // norm_in.num_groups == norm_out.num_channels // norm_out.num_groups
        )
        if isinstance(smooth, nn.MaxPool2d):
            standard_smooth = (
                smooth.kernel_size in (3, (3, 3))
                and smooth.stride in (1, (1, 1))
                and smooth.padding in (1, (1, 1))
                and smooth.dilation in (1, (1, 1))
                and not smooth.ceil_mode
                and not smooth.return_indices
            )
        else:
            standard_smooth = type(smooth) is nn.Conv2d
        return standard_adapter and standard_smooth  # (hooks were ruled out by :meth:`_fast_path_applies`)


def _is_plain_conv1x1(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


__all__ = ["LightPixelEmbedding", "PixelDecoder", "PixelDecoderOutput", "c2_xavier_fill"]
