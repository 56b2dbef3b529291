"""Hugging Face ``Mask2FormerForUniversalSegmentation`` state dict -> proscale ``Mask2Former`` state dict.

Covers HF's ResNet and Swin backbones (both the transformers-5 Swin names ``attention.{q,k,v,o}_proj`` and
the older ``attention.self.{query,key,value}`` / ``attention.output.dense`` names, with or without the
``swin.`` level). Intentionally dropped, because our model rebuilds or does not have them:
``criterion.empty_weight`` (loss weights), Swin ``relative_position_index`` (a buffer built from the
window size) and Swin's final ``layernorm`` (SwinModel's classification norm, unused by the backbone).
Use :func:`proscale.convert.load_into` to load the result with a missing / unused key report.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from proscale.convert.io import strip_common_prefix
from proscale.convert.rules import Rule, apply_rules

_BACKBONE = r"pixel_level_module\.encoder\."
_SWIN = _BACKBONE + r"(?:swin\.)?"
_BLOCK = _SWIN + r"encoder\.layers\.(?P<i>\d+)\.blocks\.(?P<j>\d+)\."
_BLOCK_OUT = r"backbone.body.layers_\g<i>.blocks.\g<j>."
_PIXEL = r"pixel_level_module\.decoder\."
_ENC_LAYER = _PIXEL + r"encoder\.layers\.(?P<l>\d+)\."
_DEC_LAYER = r"transformer_module\.decoder\.layers\.(?P<i>\d+)\."

RESNET_RULES: list[Rule] = [
    (_BACKBONE + r"embedder\.embedder\.convolution\.(?P<p>\w+)", r"backbone.body.conv1.\g<p>"),
    (_BACKBONE + r"embedder\.embedder\.normalization\.(?P<p>\w+)", r"backbone.body.bn1.\g<p>"),
    (
        _BACKBONE
        + r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\.shortcut\.(?P<m>convolution|normalization)\.(?P<p>\w+)",
        lambda m: (
            f"backbone.body.layer{int(m['s']) + 1}.{m['b']}.downsample.{0 if m['m'] == 'convolution' else 1}.{m['p']}"
        ),
    ),
    (
        _BACKBONE
        + r"encoder\.stages\.(?P<s>\d+)\.layers\.(?P<b>\d+)\.layer\.(?P<k>\d)\.(?P<m>convolution|normalization)\.(?P<p>\w+)",
        lambda m: (
            f"backbone.body.layer{int(m['s']) + 1}.{m['b']}."
            f"{'conv' if m['m'] == 'convolution' else 'bn'}{int(m['k']) + 1}.{m['p']}"
        ),
    ),
]

SWIN_RULES: list[Rule] = [
    (_SWIN + r"embeddings\.patch_embeddings\.projection\.(?P<p>\w+)", r"backbone.body.patch_embed.proj.\g<p>"),
    (_SWIN + r"embeddings\.norm\.(?P<p>\w+)", r"backbone.body.patch_embed.norm.\g<p>"),
    (_BLOCK + r"layernorm_before\.(?P<p>\w+)", _BLOCK_OUT + r"norm1.\g<p>"),
    (_BLOCK + r"layernorm_after\.(?P<p>\w+)", _BLOCK_OUT + r"norm2.\g<p>"),
    (_BLOCK + r"attention\.(?P<part>[qkv])_proj\.(?P<p>\w+)", _BLOCK_OUT + r"attn.qkv.\g<p>{qkv}"),
    (_BLOCK + r"attention\.self\.(?P<part>query|key|value)\.(?P<p>\w+)", _BLOCK_OUT + r"attn.qkv.\g<p>{qkv}"),
    (_BLOCK + r"attention\.(?:o_proj|output\.dense)\.(?P<p>\w+)", _BLOCK_OUT + r"attn.proj.\g<p>"),
    (_BLOCK + r"attention\..*relative_position_index", None),
    (_BLOCK + r"attention\..*relative_position_bias_table", _BLOCK_OUT + r"attn.relative_position_bias_table"),
    (_BLOCK + r"(?:mlp\.fc1|intermediate\.dense)\.(?P<p>\w+)", _BLOCK_OUT + r"mlp.fc1.\g<p>"),
    (_BLOCK + r"(?:mlp\.fc2|output\.dense)\.(?P<p>\w+)", _BLOCK_OUT + r"mlp.fc2.\g<p>"),
    (
        _SWIN + r"encoder\.layers\.(?P<i>\d+)\.downsample\.(?P<p>.+)",
        # HF merges patches at the end of a stage, timm at the start of the next one
        lambda m: f"backbone.body.layers_{int(m['i']) + 1}.downsample.{m['p']}",
    ),
    (
        _BACKBONE + r"hidden_states_norms\.stage(?P<k>\d)\.(?P<p>\w+)",
        lambda m: f"backbone.output_norms.{int(m['k']) - 1}.{m['p']}",
    ),
    (_SWIN + r"layernorm\.\w+", None),
]

DECODER_RULES: list[Rule] = [
    (_PIXEL + r"input_projections\.(?P<rest>.+)", r"pixel_decoder.input_proj.\g<rest>"),
    (_PIXEL + r"level_embed", "pixel_decoder.encoder.embed.level_embed"),
    (_ENC_LAYER + r"self_attn\.(?P<rest>.+)", r"pixel_decoder.encoder.layers.\g<l>.self_attn.\g<rest>"),
    (_ENC_LAYER + r"fc1\.(?P<p>\w+)", r"pixel_decoder.encoder.layers.\g<l>.linear1.\g<p>"),
    (_ENC_LAYER + r"fc2\.(?P<p>\w+)", r"pixel_decoder.encoder.layers.\g<l>.linear2.\g<p>"),
    (_ENC_LAYER + r"self_attn_layer_norm\.(?P<p>\w+)", r"pixel_decoder.encoder.layers.\g<l>.norm1.\g<p>"),
    (_ENC_LAYER + r"final_layer_norm\.(?P<p>\w+)", r"pixel_decoder.encoder.layers.\g<l>.norm2.\g<p>"),
    (_PIXEL + r"(?P<m>adapter_1|layer_1)\.(?P<rest>.+)", r"pixel_decoder.\g<m>.\g<rest>"),
    (_PIXEL + r"mask_projection\.(?P<p>\w+)", r"pixel_decoder.mask_features.\g<p>"),
    (r"transformer_module\.queries_features\.weight", "transformer_decoder.query_feat.weight"),
    (r"transformer_module\.queries_embedder\.weight", "transformer_decoder.query_embed.weight"),
    (r"transformer_module\.level_embed\.weight", "transformer_decoder.level_embed.weight"),
    (r"transformer_module\.input_projections\.(?P<rest>.+)", r"transformer_decoder.input_proj.\g<rest>"),
    (
        _DEC_LAYER + r"self_attn\.(?P<part>[qkv])_proj\.(?P<p>weight|bias)",
        r"transformer_decoder.transformer_self_attention_layers.\g<i>.self_attn.in_proj_\g<p>{qkv}",
    ),
    (
        _DEC_LAYER + r"self_attn\.out_proj\.(?P<p>\w+)",
        r"transformer_decoder.transformer_self_attention_layers.\g<i>.self_attn.out_proj.\g<p>",
    ),
    (
        _DEC_LAYER + r"self_attn_layer_norm\.(?P<p>\w+)",
        r"transformer_decoder.transformer_self_attention_layers.\g<i>.norm.\g<p>",
    ),
    (
        _DEC_LAYER + r"cross_attn\.(?P<rest>.+)",
        r"transformer_decoder.transformer_cross_attention_layers.\g<i>.multihead_attn.\g<rest>",
    ),
    (
        _DEC_LAYER + r"cross_attn_layer_norm\.(?P<p>\w+)",
        r"transformer_decoder.transformer_cross_attention_layers.\g<i>.norm.\g<p>",
    ),
    (_DEC_LAYER + r"fc1\.(?P<p>\w+)", r"transformer_decoder.transformer_ffn_layers.\g<i>.linear1.\g<p>"),
    (_DEC_LAYER + r"fc2\.(?P<p>\w+)", r"transformer_decoder.transformer_ffn_layers.\g<i>.linear2.\g<p>"),
    (_DEC_LAYER + r"final_layer_norm\.(?P<p>\w+)", r"transformer_decoder.transformer_ffn_layers.\g<i>.norm.\g<p>"),
    (r"transformer_module\.decoder\.layernorm\.(?P<p>\w+)", r"transformer_decoder.decoder_norm.\g<p>"),
    (
        r"transformer_module\.decoder\.mask_predictor\.mask_embedder\.(?P<k>\d)\.0\.(?P<p>\w+)",
        r"transformer_decoder.mask_embed.layers.\g<k>.\g<p>",
    ),
    (r"class_predictor\.(?P<p>\w+)", r"transformer_decoder.class_embed.\g<p>"),
    (r"criterion\..*", None),
]


def hf_to_proscale(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and fuse q/k/v of) an HF Mask2Former state dict into proscale's ``Mask2Former`` names.

    Accepts ``Mask2FormerForUniversalSegmentation`` keys (``model.…`` + ``class_predictor.…``) or a bare
    ``Mask2FormerModel`` (no class head: load it with ``allow_partial``). Unknown keys pass through.
    """
    state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state_dict.items()}
    state = strip_common_prefix(state, ("module.",))
    return apply_rules(state, RESNET_RULES + SWIN_RULES + DECODER_RULES)


__all__ = ["hf_to_proscale"]
