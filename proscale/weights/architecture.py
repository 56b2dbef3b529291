"""Reading a model's architecture off its weights (for files that do not carry their config).

:func:`derive_overrides` looks only at tensor names and shapes of a state dict in proscale names
(``proscale.models.Mask2Former``) and returns dotted overrides relative to the model config, e.g.
``{"num_classes": 133, "encoder.schedule": [3, 3, 3], "lpe": True, "backbone.name": "r50"}``.

What the shapes cannot tell is left to the configured model: the number of attention heads and sampling points,
dropout, TRC's temperature. Two keys switch a whole config node when they differ from the configured one
(:mod:`proscale.weights.resolve` rebuilds the node): ``backbone.name`` and ``encoder.name``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

_ENC_OFFSETS = re.compile(r"pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\.sampling_offsets\.weight")
_DEC_LAYER = re.compile(r"transformer_decoder\.transformer_self_attention_layers\.(\d+)\.")
_RES_BLOCK = re.compile(r"backbone\.body\.layer([1-4])\.(\d+)\.conv([123])\.weight")
_SWIN_BLOCK = re.compile(r"backbone\.body\.layers_(\d)\.blocks\.(\d+)\.attn\.relative_position_bias_table")

# (bottleneck?, blocks per stage) -> (backbone config name, timm model name)
_RESNETS = {
    (True, (3, 4, 6, 3)): ("r50", None),
    (True, (2, 2, 2, 2)): ("timm", "resnet26"),
    (True, (3, 4, 23, 3)): ("timm", "resnet101"),
    (True, (3, 8, 36, 3)): ("timm", "resnet152"),
    (False, (2, 2, 2, 2)): ("timm", "resnet18"),
    (False, (3, 4, 6, 3)): ("timm", "resnet34"),
}
SWIN_T = {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7}


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return tuple(value.shape) if value is not None else None


def _head_overrides(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Transformer decoder and pixel decoder widths, query count, layer counts, classes, LPE."""
    out: dict[str, Any] = {}
    classes = _shape(state, "transformer_decoder.class_embed.weight")
    if classes:
        out["num_classes"] = classes[0] - 1  # the last row is "no object"
    queries = _shape(state, "transformer_decoder.query_feat.weight")
    if queries:
        out["num_queries"], out["hidden_dim"] = queries
    layers = {int(m.group(1)) for k in state if (m := _DEC_LAYER.match(k))}
    if layers:
        out["dec_layers"] = max(layers) + 1
    ffn = _shape(state, "transformer_decoder.transformer_ffn_layers.0.linear1.weight")
    if ffn:
        out["dim_feedforward"] = ffn[0]
    conv = _shape(state, "pixel_decoder.input_proj.0.0.weight")
    if conv:
        out["conv_dim"] = conv[0]
    mask = _shape(state, "pixel_decoder.mask_features.weight")
    if mask:
        out["mask_dim"] = mask[0]
    if "pixel_decoder.layer_1.1.weight" in state:  # LPE replaces layer_1's conv by a max-pool: only its norm stays
        out["lpe"] = "pixel_decoder.layer_1.0.weight" not in state
    return out


def encoder_levels(state: Mapping[str, Tensor], num_levels: int = 3) -> list[int]:
    """Levels each deformable encoder layer attends to, in layer order (empty when there are none).

    ``sampling_offsets`` has ``n_heads * levels * n_points * 2`` outputs; the last layer attends to every level,
    so its size divided by ``num_levels`` is the per-level size whatever the head and point counts.
    """
    sizes = {int(m.group(1)): v.shape[0] for k, v in state.items() if (m := _ENC_OFFSETS.fullmatch(k))}
    if not sizes:
        return []
    if sorted(sizes) != list(range(len(sizes))):
        raise ValueError(f"encoder layer indices have gaps: {sorted(sizes)}")
    ordered = [sizes[k] for k in range(len(sizes))]
    per_level, remainder = divmod(ordered[-1], num_levels)
    if remainder or any(size % per_level for size in ordered):
        raise ValueError(f"encoder sampling offsets of sizes {ordered} do not split into {num_levels} levels")
    return [size // per_level for size in ordered]


def _encoder_overrides(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """M2F (every layer on all 3 levels, no TRC) or PRO-SCALE (schedule, TRC); nothing for other encoders."""
    levels = encoder_levels(state)
    if not levels:
        return {}
    out: dict[str, Any] = {}
    ffn = _shape(state, "pixel_decoder.encoder.layers.0.linear1.weight")
    if ffn:
        out["encoder.dim_feedforward"] = ffn[0]
    has_trc = any(k.startswith("pixel_decoder.encoder.trc.") for k in state)
    if all(n == 3 for n in levels) and not has_trc:
        return {"encoder.name": "m2f", "encoder.num_layers": len(levels), **out}
    if levels != sorted(levels) or levels[-1] != 3 or levels[0] < 1:
        raise ValueError(f"encoder layers attend to {levels} levels: neither Mask2Former's nor a PRO-SCALE schedule")
    schedule = [levels.count(level) for level in (1, 2, 3)]
    return {"encoder.name": "proscale", "encoder.schedule": schedule, "encoder.trc": has_trc, **out}


def _backbone_overrides(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """ResNets by block counts; Swin by width, depths and heads (Swin-T exactly -> ``swin_t``)."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state:
        if match := _RES_BLOCK.fullmatch(key):
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
            bottleneck |= match.group(3) == "3"
    if blocks:
        depths = tuple(len(blocks.get(stage, ())) for stage in (1, 2, 3, 4))
        known = _RESNETS.get((bottleneck, depths))
        if known is None or "backbone.body.conv1.weight" not in state:  # e.g. deep-stem variants: leave as configured
            return {}
        name, model_name = known
        return (
            {"backbone.name": name}
            if model_name is None
            else {"backbone.name": name, "backbone.model_name": model_name}
        )
    swin_blocks: dict[int, dict[int, int]] = {}
    for key, value in state.items():
        if match := _SWIN_BLOCK.fullmatch(key):
            swin_blocks.setdefault(int(match.group(1)), {})[int(match.group(2))] = value.shape[1]
    embed = _shape(state, "backbone.body.patch_embed.proj.weight")
    if not swin_blocks or not embed:
        return {}
    stages = [swin_blocks.get(i, {}) for i in range(max(swin_blocks) + 1)]
    table = state[f"backbone.body.layers_0.blocks.{min(stages[0])}.attn.relative_position_bias_table"].shape[0]
    window = int(round(table**0.5 + 1)) // 2  # the table has (2w - 1)^2 rows
    found = {
        "embed_dim": embed[0],
        "depths": [len(stage) for stage in stages],
        "num_heads": [next(iter(stage.values())) for stage in stages],
        "window_size": window,
    }
    if found == SWIN_T:
        return {"backbone.name": "swin_t"}
    return {
        "backbone.name": "timm",
        "backbone.model_name": "swin_tiny_patch4_window7_224",  # the architecture; the sizes below replace its own
        **{f"backbone.{k}": v for k, v in found.items()},
        "backbone.strict_img_size": False,
        "backbone.always_partition": True,
        "backbone.output_norms": "backbone.output_norms.0.weight" in state,
        "backbone._convert_": "all",  # timm wants plain lists for depths / heads, not OmegaConf's ListConfig
    }


def derive_overrides(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Dotted model-config overrides read off a proscale-named state dict (see the module docstring)."""
    return {**_backbone_overrides(state), **_encoder_overrides(state), **_head_overrides(state)}


def hf_config_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a Hugging Face ``Mask2FormerConfig`` (``config.json``) adds to the weights: the attention heads
    (``num_attention_heads``, shared by HF's pixel decoder and transformer decoder; 4 sampling points)."""
    out: dict[str, Any] = {}
    heads = config.get("num_attention_heads")
    if heads:
        out["nheads"] = int(heads)
        out["encoder.n_heads"] = int(heads)  # HF's pixel decoder uses the same head count
        out["encoder.n_points"] = 4  # fixed in HF's deformable attention
    return out


__all__ = ["derive_overrides", "encoder_levels", "hf_config_overrides"]
