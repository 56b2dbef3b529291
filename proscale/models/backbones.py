"""Backbones: any timm network with four feature levels, as ``res2..res5`` NCHW maps at strides 4/8/16/32.

``BACKBONES`` names: ``"r50"`` (ResNet-50), ``"swin_t"`` (Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24,
window 7), ``"timm"`` (any timm model by ``model_name``; this module also registers the CPU-scale Swin
``swin_micro_patch4_window4`` with timm, see :func:`swin_micro_patch4_window4`). ``pretrained``: a local ImageNet file (detectron2 ``.pkl``,
torchvision / timm ``.pth`` / ``.safetensors``, official Swin ``.pth``; layout found by content), ``true`` (timm's
hub download) or ``none`` / null (random): :mod:`proscale.models.backbone_weights`.

Every backbone::

    forward(images (B, 3, H, W)) -> {"res2": (B, C2, H/4, W/4), "res3": (B, C3, H/8, W/8),
                                     "res4": (B, C4, H/16, W/16), "res5": (B, C5, H/32, W/32)}
    out_channels: {"res2": C2, ...}     strides: {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

Module names: ``body`` is the timm ``features_only`` network (so timm names inside it, with timm's
``layers.0 -> layers_0`` flattening), ``output_norms.{i}`` the optional per-output LayerNorms.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from proscale.models.backbone_weights import (
    FROM_FILE,
    FROM_HUB,
    pretrained_choice,
    read_backbone_state_dict,
    weight_sources,
)
from proscale.models.ops.graph_capture import capturing
from proscale.registry import Registry

log = logging.getLogger(__name__)  # the models stay free of Lightning imports
BACKBONES = Registry("backbone")
FEATURE_NAMES = ("res2", "res3", "res4", "res5")
EXPECTED_STRIDES = (4, 8, 16, 32)


class _PadFirstSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the original padding order: pad to whole windows, *then* cyclic shift.

    timm shifts first and pads afterwards; the original Swin (and detectron2's D2SwinTransformer and HF's
    SwinBackbone) pad first, so zero tokens sit at the bottom/right of the padded map and the shifted-window
    mask covers the padded extent. The two differ whenever a map is not a multiple of the window (every
    stage of a typical 800x1088 input), so checkpoints converted from detectron2 / HF need this order.
    Windows are always full-size (``always_partition``), as in the original, even on maps smaller than 7.
    """

    def _shift_mask(self, x: Tensor) -> Tensor:
        if capturing():  # symbolic sizes (dynamic export) cannot key a cache
            return self.get_attn_mask(x)
        key = (x.shape[1], x.shape[2], x.device, x.dtype)
        cache = self.__dict__.setdefault("_mask_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = self.get_attn_mask(x)
        return cache[key]

    def _attn(self, x: Tensor) -> Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shift_h, shift_w = self.shift_size
        mask = None
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
            mask = self._shift_mask(x)
        windows = window_partition(x, self.window_size).view(-1, win_h * win_w, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if shift_h or shift_w:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width].contiguous()


class TimmBackbone(nn.Module):
    """A timm ``features_only`` network returning the last four levels as ``res2..res5`` (see module doc).

    Args:
        model_name: timm model name (e.g. ``"resnet50"``).
        pretrained: ImageNet weights: a local file path, ``True`` / ``"true"`` (timm's hub download), or
            None / ``"none"`` for random weights (see :func:`~proscale.models.backbone_weights.pretrained_choice`).
        output_norms: add one LayerNorm per output level (D2SwinTransformer's ``norm{i}``).
        freeze_bn: turn BatchNorm into FrozenBatchNorm (what detectron2 does with pretrained ResNets).
        allow_unsafe_load: read a ``pretrained`` file that needs unrestricted unpickling (trusted files only).
        **timm_kwargs: forwarded to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | bool | None = None,
        output_norms: bool = False,
        freeze_bn: bool = False,
        allow_unsafe_load: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self._timm_kwargs = dict(timm_kwargs)
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=(-4, -3, -2, -1), **timm_kwargs
        )
        strides = tuple(self.body.feature_info.reduction())
        if strides != EXPECTED_STRIDES:
            raise ValueError(
                f"backbone {model_name!r} has feature strides {strides}; res2..res5 need {EXPECTED_STRIDES}"
            )
        for module in self.body.modules():
            if type(module) is SwinTransformerBlock:
                module.__class__ = _PadFirstSwinBlock
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        channels = self.body.feature_info.channels()
        self.out_channels = dict(zip(FEATURE_NAMES, channels))
        self.strides = dict(zip(FEATURE_NAMES, EXPECTED_STRIDES))
        self.output_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels) if output_norms else None
        choice = pretrained_choice(pretrained)
        if choice == FROM_FILE:
            self.load_pretrained(str(pretrained), allow_unsafe_load=allow_unsafe_load)
        elif choice == FROM_HUB:
            self.load_from_hub()
        if freeze_bn:
            if choice not in (FROM_FILE, FROM_HUB):
                log.warning(
                    f"backbone {model_name!r}: freeze_bn=true with random weights keeps BatchNorm at its initial "
                    "statistics (mean 0, var 1) for the whole run; from scratch, model.backbone.freeze_bn=false trains them"
                )
            self.body = timm.layers.freeze_batch_norm_2d(self.body)

    def _classifier(self, pretrained: bool = False) -> nn.Module:
        """The full timm classification model of the same architecture (names and filters of its checkpoints)."""
        return timm.create_model(self.model_name, pretrained=pretrained, **self._timm_kwargs)

    def load_pretrained(self, path: str, allow_unsafe_load: bool = False) -> None:
        """Load a local ImageNet file (any layout of :mod:`proscale.models.backbone_weights`) into ``body``;
        raises ValueError naming the file and the keys that do not fit."""
        state, layout = read_backbone_state_dict(path, allow_unsafe=allow_unsafe_load)
        renamed = " (names below as renamed to torchvision's)" if layout == "detectron2" else ""
        self.load_classifier_state(state, f"backbone weights {path}{renamed}")

    def load_from_hub(self) -> None:
        """``pretrained=true``: timm's own hub download of the classification weights (fails at once offline)."""
        try:
            full = self._classifier(pretrained=True)
        except Exception as error:  # hub / network errors come in many types; the cause stays chained
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            detail = (str(error).splitlines() or [""])[0]
            raise ValueError(
                f"model.backbone.pretrained=true: timm could not download the ImageNet weights of {self.model_name!r} "
                f"from the Hugging Face hub ({type(error).__name__}: {detail}). "
                + (
                    "The apps run offline (HF_HUB_OFFLINE=1, set unless already set; HF_HUB_OFFLINE=0 allows "
                    "downloads). "
                    if offline
                    else ""
                )
                + f"Pass a local file instead: model.backbone.pretrained=/path/to/file, e.g. "
                f"{weight_sources(self.model_name)}; or model.backbone.pretrained=none to train from scratch."
            ) from error
        self.load_classifier_state(full.state_dict(), f"timm hub weights of {self.model_name!r}")

    def load_classifier_state(self, state: dict[str, Tensor], source: str) -> None:
        """Load a classification model's state dict (timm / torchvision / original names) into ``body``.

        Keys the features-only network drops (classifier, final norm) are ignored; timm's own
        ``checkpoint_filter_fn`` adapts original checkpoints (e.g. Swin's downsample placement and buffers).
        Anything else missing, unexpected or mis-shaped is a ValueError naming ``source`` and the keys.
        """
        full = self._classifier()
        filter_fn = getattr(sys.modules[type(full).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, full)
        full_keys = set(full.state_dict())
        target = self.body.state_dict()
        mapped: dict[str, Tensor] = {}
        unexpected = []
        for key, value in state.items():
            # features_only flattens nested Sequentials: "layers.0.x" becomes "layers_0.x"
            for candidate in (key, key.replace(".", "_", 1)):
                if candidate in target:
                    mapped[candidate] = value
                    break
            else:
                if key not in full_keys:
                    unexpected.append(key)
        missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
        mismatched = [k for k, v in mapped.items() if tuple(v.shape) != tuple(target[k].shape)]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{source} does not fit backbone {self.model_name!r}: "
                f"missing keys {missing[:20]}{'...' if len(missing) > 20 else ''}, "
                f"unexpected keys {unexpected[:20]}{'...' if len(unexpected) > 20 else ''}, "
                f"shape mismatches {[(k, tuple(mapped[k].shape), tuple(target[k].shape)) for k in mismatched[:20]]}"
            )
        self.body.load_state_dict(mapped, strict=False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = {}
        for level, (name, feature) in enumerate(zip(FEATURE_NAMES, self.body(images))):
            if not self.channels_last:
                feature = feature.permute(0, 2, 3, 1)  # the norms act on the channel axis
            if self.output_norms is not None:
                feature = self.output_norms[level](feature)
            out[name] = feature.permute(0, 3, 1, 2).contiguous()
        return out


@register_model
def swin_micro_patch4_window4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A Swin small enough for the CPU presets' 128x160 images, registered with timm under this name so that the
    generic ``timm`` backbone takes it like any other model (``model.backbone.model_name=swin_micro_patch4_window4``).

    Swin-T's architecture (timm ``swin_tiny_patch4_window7_224``) with embed 32, depths 1-1-2-1, heads 1-2-4-8 and
    4x4 windows: at 128x160 the four stages are 32x40, 16x20, 8x10 and 4x5 tokens, so every stage has more than one
    window. Any input size works (``strict_img_size=False``; windows padded first, as for ``swin_t``). There are no
    ImageNet weights of this size: ``pretrained`` must stay false (the CPU presets pre-train it, ``pretrain=semantic``).
    """
    if pretrained:
        raise ValueError("swin_micro_patch4_window4 has no ImageNet weights; use model.backbone.pretrained=none")
    settings = {
        "embed_dim": 32,
        "depths": (1, 1, 2, 1),
        "num_heads": (1, 2, 4, 8),
        "window_size": 4,
        "strict_img_size": False,
        "always_partition": True,
        **kwargs,
    }
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **settings)


@BACKBONES.register("r50")
def resnet50(pretrained: str | bool | None = None, freeze_bn: bool = False, **timm_kwargs: Any) -> TimmBackbone:
    """ResNet-50 (torchvision layout: stride in the 3x3 conv, like Mask2Former's STRIDE_IN_1X1=False)."""
    return TimmBackbone("resnet50", pretrained=pretrained, freeze_bn=freeze_bn, **timm_kwargs)


@BACKBONES.register("swin_t")
def swin_tiny(pretrained: str | bool | None = None, drop_path_rate: float = 0.3, **timm_kwargs: Any) -> TimmBackbone:
    """Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7) with D2SwinTransformer's output norms.

    Any input size that is a multiple of 32 works (``strict_img_size=False``, windows always partitioned).
    """
    timm_kwargs = {"strict_img_size": False, "always_partition": True, **timm_kwargs}
    return TimmBackbone(
        "swin_tiny_patch4_window7_224",
        pretrained=pretrained,
        output_norms=True,
        drop_path_rate=drop_path_rate,
        **timm_kwargs,
    )


@BACKBONES.register("timm")
def timm_backbone(
    model_name: str, pretrained: str | bool | None = None, output_norms: bool = False, **timm_kwargs: Any
) -> TimmBackbone:
    """Any timm model whose last four feature levels have strides 4/8/16/32."""
    return TimmBackbone(model_name, pretrained=pretrained, output_norms=output_norms, **timm_kwargs)


def build_backbone(name: str, **kwargs: Any) -> TimmBackbone:
    """``BACKBONES.build`` for Hydra configs: ``_target_: proscale.models.backbones.build_backbone``."""
    return BACKBONES.build(name, **kwargs)


build_backbone.registry = BACKBONES  # type: ignore[attr-defined]  (config checks look through to the backbone)


__all__ = ["BACKBONES", "TimmBackbone", "build_backbone"]
