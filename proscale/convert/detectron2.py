"""Original Mask2Former (detectron2) checkpoint -> proscale ``Mask2Former`` state dict.

Model-zoo files are pickles of numpy arrays under ``"model"`` (read them with
:func:`proscale.convert.io.read_state_dict`). Backbones: detectron2 ResNet (``stem.conv1``,
``res{2..5}.{b}.conv{1,2,3}``, ``shortcut``, FrozenBN ``.norm``) and D2SwinTransformer (``patch_embed``,
``layers.{i}``, ``norm{i}``). The pixel decoder's ``transformer.encoder.*`` keys map generically to
``pixel_decoder.encoder.*`` (flat layer indices carry over; encoders that group layers differently, e.g.
PRO-SCALE stages, re-index them afterwards); ``transformer.level_embed`` becomes
``pixel_decoder.encoder.embed.level_embed``. LPE checkpoints simply have no ``layer_1.weight``.
Intentionally dropped: ``pixel_mean`` / ``pixel_std`` (the data pipeline normalizes),
``criterion.empty_weight`` and Swin's ``relative_position_index`` / ``attn_mask`` buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from proscale.convert.io import strip_common_prefix
from proscale.convert.rules import Rule, apply_rules

_RES_BLOCK = r"backbone\.res(?P<n>[2-5])\.(?P<b>\d+)\."
_PIXEL = r"sem_seg_head\.pixel_decoder\."


def _res_layer(match) -> str:
    return f"backbone.body.layer{int(match['n']) - 1}.{match['b']}."


RESNET_RULES: list[Rule] = [
    (r"backbone\.stem\.conv1\.weight", "backbone.body.conv1.weight"),
    (r"backbone\.stem\.conv1\.norm\.(?P<p>\w+)", r"backbone.body.bn1.\g<p>"),
    (_RES_BLOCK + r"conv(?P<k>[123])\.weight", lambda m: _res_layer(m) + f"conv{m['k']}.weight"),
    (_RES_BLOCK + r"conv(?P<k>[123])\.norm\.(?P<p>\w+)", lambda m: _res_layer(m) + f"bn{m['k']}.{m['p']}"),
    (_RES_BLOCK + r"shortcut\.weight", lambda m: _res_layer(m) + "downsample.0.weight"),
    (_RES_BLOCK + r"shortcut\.norm\.(?P<p>\w+)", lambda m: _res_layer(m) + f"downsample.1.{m['p']}"),
]

SWIN_RULES: list[Rule] = [
    (r"backbone\.patch_embed\.(?P<rest>.+)", r"backbone.body.patch_embed.\g<rest>"),
    (r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index", None),
    (r"backbone\.layers\.\d+\.blocks\.\d+\.attn_mask", None),
    (r"backbone\.layers\.(?P<i>\d+)\.blocks\.(?P<rest>.+)", r"backbone.body.layers_\g<i>.blocks.\g<rest>"),
    (
        r"backbone\.layers\.(?P<i>\d+)\.downsample\.(?P<rest>.+)",
        # the original merges patches at the end of a stage, timm at the start of the next one
        lambda m: f"backbone.body.layers_{int(m['i']) + 1}.downsample.{m['rest']}",
    ),
    (r"backbone\.norm(?P<i>\d)\.(?P<p>\w+)", r"backbone.output_norms.\g<i>.\g<p>"),
]

HEAD_RULES: list[Rule] = [
    (_PIXEL + r"input_proj\.(?P<rest>.+)", r"pixel_decoder.input_proj.\g<rest>"),
    (_PIXEL + r"transformer\.level_embed", "pixel_decoder.encoder.embed.level_embed"),
    (_PIXEL + r"transformer\.encoder\.(?P<rest>.+)", r"pixel_decoder.encoder.\g<rest>"),
    (_PIXEL + r"(?P<m>adapter_1|layer_1)\.weight", r"pixel_decoder.\g<m>.0.weight"),
    (_PIXEL + r"(?P<m>adapter_1|layer_1)\.norm\.(?P<p>\w+)", r"pixel_decoder.\g<m>.1.\g<p>"),
    (_PIXEL + r"mask_features\.(?P<p>\w+)", r"pixel_decoder.mask_features.\g<p>"),
    (r"sem_seg_head\.predictor\.mask_embed\.layers\.(?P<rest>.+)", r"transformer_decoder.mask_embed.layers.\g<rest>"),
    (r"sem_seg_head\.predictor\.static_query\.weight", "transformer_decoder.query_feat.weight"),  # pre-v2 name
    (r"sem_seg_head\.predictor\.(?P<rest>.+)", r"transformer_decoder.\g<rest>"),
    (r"(?:pixel_mean|pixel_std)", None),
    (r"criterion\..*", None),
]


def detectron2_to_proscale(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original Mask2Former state dict (ResNet or Swin backbone) into proscale names.

    Unknown keys pass through unchanged, so :func:`proscale.convert.load_into` names them.
    """
    state = strip_common_prefix(state_dict, ("module.",))
    return apply_rules(state, RESNET_RULES + SWIN_RULES + HEAD_RULES)


__all__ = ["detectron2_to_proscale"]
