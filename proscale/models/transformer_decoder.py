"""Mask2Former's masked-attention transformer decoder (``MultiScaleMaskedTransformerDecoder``).

Learnable queries (features + positional embeddings) pass through ``dec_layers`` layers that cycle over
the pixel decoder's three maps (1/32, 1/16, 1/8, 1/32, ...). Each layer is masked cross-attention ->
self-attention -> FFN, post-norm, dropout 0. A prediction (class logits + mask logits) is made from the
queries before the first layer and after every layer, so ``dec_layers + 1`` in all; the mask predicted
by one step, resized to the next layer's level and thresholded at sigmoid 0.5, is that layer's
cross-attention mask (a query whose mask would hide everything attends everywhere instead).

Module names follow the original implementation, so detectron2 checkpoints map one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from proscale.models.ops.graph_capture import spatial_size
from proscale.models.pixel_decoder import c2_xavier_fill
from proscale.models.position_encoding import PositionEmbeddingSine


class CrossAttentionLayer(nn.Module):
    """x = norm(x + MHA(q=x + query_pos, k=memory + pos, v=memory, mask)); batch-first (B, Q, C)."""

    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.multihead_attn.in_proj_weight)
        nn.init.xavier_uniform_(self.multihead_attn.out_proj.weight)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(tgt + attended)


class SelfAttentionLayer(nn.Module):
    """x = norm(x + MHA(q=k=x + query_pos, v=x)); batch-first (B, Q, C)."""

    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.self_attn.in_proj_weight)
        nn.init.xavier_uniform_(self.self_attn.out_proj.weight)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, tgt, need_weights=False)[0])


class FFNLayer(nn.Module):
    """x = norm(x + linear2(relu(linear1(x))))."""

    def __init__(self, d_model: int, dim_feedforward: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask embedding head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder with class and mask heads.

    Args:
        in_channels: channels of the pixel decoder's maps (a 1x1 input projection is added if != hidden_dim).
        num_classes: K; the class head predicts K+1 logits (the last is "no object").
        hidden_dim, num_queries, nheads, dim_feedforward: 256, 100, 8, 2048 in Mask2Former.
        dec_layers: number of masked-attention layers (9; the original config's DEC_LAYERS=10 counts the
            prediction from the learnable queries as well).
        mask_dim: channels of the pixel decoder's ``mask_features``.

    forward(multi_scale_features [(B, C, H_l, W_l)] x 3 coarse first, mask_features (B, mask_dim, H/4, W/4))
    -> {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4),
        "aux_outputs": [dec_layers dicts with the same two keys, earliest first]}
    """

    num_levels = 3

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if dec_layers < 1 or num_queries < 1:
            raise ValueError(f"dec_layers and num_queries must be >= 1, got {dec_layers} and {num_queries}")
        if hidden_dim % nheads != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by nheads ({nheads})")
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(self.num_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_levels):
            if in_channels != hidden_dim:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    # Activation checkpointing (``model.checkpointing``, set by Mask2Former): while training, each layer keeps only
    # its inputs and recomputes its activations in the backward pass.
    activation_checkpointing: bool = False

    def forward(self, multi_scale_features: list[Tensor], mask_features: Tensor) -> dict:
        if len(multi_scale_features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(multi_scale_features)}")
        memories, positions, sizes = [], [], []
        for level, feature in enumerate(multi_scale_features):
            sizes.append(spatial_size(feature))
            pos = self.pe_layer(feature).flatten(2).transpose(1, 2)  # (B, HW, C)
            memory = self.input_proj[level](feature).flatten(2).transpose(1, 2) + self.level_embed.weight[level]
            positions.append(pos)
            memories.append(memory)
        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        predictions = []
        logits, masks, attn_mask = self._predict(output, mask_features, sizes[0])
        predictions.append({"pred_logits": logits, "pred_masks": masks})
        for i in range(self.num_layers):
            level = i % self.num_levels
            # a query whose mask hides every position attends everywhere instead
            attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)
            if self.activation_checkpointing and torch.is_grad_enabled():
                output = torch.utils.checkpoint.checkpoint(
                    self._layer, i, output, memories[level], attn_mask, positions[level], query_pos, use_reentrant=False
                )
            else:
                output = self._layer(i, output, memories[level], attn_mask, positions[level], query_pos)
            logits, masks, attn_mask = self._predict(output, mask_features, sizes[(i + 1) % self.num_levels])
            predictions.append({"pred_logits": logits, "pred_masks": masks})
        return {**predictions[-1], "aux_outputs": predictions[:-1]}

    def _layer(
        self, i: int, output: Tensor, memory: Tensor, attn_mask: Tensor, pos: Tensor, query_pos: Tensor
    ) -> Tensor:
        """Decoder layer ``i``: masked cross-attention, self-attention, FFN on the queries (B, Q, C)."""
        output = self.transformer_cross_attention_layers[i](output, memory, attn_mask, pos, query_pos)
        output = self.transformer_self_attention_layers[i](output, query_pos)
        return self.transformer_ffn_layers[i](output)

    def _predict(
        self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Heads on the normed queries -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4) and the next
        layer's attention mask (B*heads, Q, h*w) bool, True = not attended."""
        decoded = self.decoder_norm(output)
        logits = self.class_embed(decoded)
        masks = (self.mask_embed(decoded) @ mask_features.flatten(2)).unflatten(-1, mask_features.shape[-2:])
        resized = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        attn_mask = (resized.sigmoid().flatten(2) < 0.5).detach()
        attn_mask = attn_mask.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        return logits, masks, attn_mask


__all__ = ["MaskedTransformerDecoder"]
