"""The interface every multi-scale encoder implements, and the pieces the deformable ones share.

An encoder sits inside the pixel decoder between the input projections and the FPN tail:

    input : feats = [s5, s4, s3], each (B, C, H_l, W_l), coarse first (strides 32, 16, 8), C = d_model
    output: the same list layout and shapes, refined

so the pixel decoder, transformer decoder, loss and inference never care which encoder runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from proscale.models.ops import MSDeformAttn
from proscale.models.ops.graph_capture import capturing, spatial_size
from proscale.models.ops.inference_gate import fast_inference_allowed
from proscale.models.position_encoding import PositionEmbeddingSine
from proscale.registry import Registry

ENCODERS = Registry("encoder")

# Rows per chunk of the inference FFN (512 x 1024 fp32 hidden = 2 MB, cache-sized).
FFN_CHUNK_ROWS = 512


class MultiScaleEncoder(nn.Module):
    """Base class: ``forward(feats: list[(B, C, H_l, W_l)] coarse first) -> same shapes``."""

    d_model: int
    num_levels: int = 3

    def forward(self, feats: list[Tensor]) -> list[Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def flatten_levels(feats: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """[(B, C, H_l, W_l)] -> tokens (B, sum H_l*W_l, C) and the Python-int spatial shapes."""
    shapes = [spatial_size(f) for f in feats]
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)
    return tokens, shapes


def unflatten_levels(tokens: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`: (B, S, C) -> [(B, C, H_l, W_l)]."""
    batch, _, channels = tokens.shape
    chunks = tokens.split([h * w for h, w in shapes], dim=1)
    return [c.transpose(1, 2).reshape(batch, channels, h, w) for c, (h, w) in zip(chunks, shapes)]


class DeformableEncoderLayer(nn.Module):
    """One Deformable-DETR encoder layer, post-norm (Mask2Former's ``MSDeformAttnTransformerEncoderLayer``).

    x = norm1(x + attn(x + pos)); x = norm2(x + ffn(x)).

    forward(tokens (B, S, C), pos (B, S, C), reference_points (B, S, L, 2), spatial_shapes) -> (B, S, C)
    where the queries are the tokens themselves (self-attention over all levels).
    ``query_slice`` lets a layer update only the first ``n`` tokens while sampling from all of them
    (Lite-DETR's high-level updates): then tokens/pos/reference_points are the full sequence and only
    ``tokens[:, :n]`` is returned updated, the rest passes through unchanged.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 3,
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        # in place: saves allocating (and page-faulting) one more (B, S, FFN) tensor per layer
        self.activation = {"relu": nn.ReLU(inplace=True), "gelu": nn.GELU()}[activation]
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    # Activation checkpointing (``model.checkpointing``, set by Mask2Former): while training, keep only the layer's
    # inputs and recompute its activations in the backward pass (less memory, one more forward of the layer).
    activation_checkpointing: bool = False

    def forward(
        self,
        tokens: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
        num_queries: int | None = None,
    ) -> Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._forward, tokens, pos, reference_points, spatial_shapes, num_queries, use_reentrant=False
            )
        return self._forward(tokens, pos, reference_points, spatial_shapes, num_queries)

    def _forward(
        self,
        tokens: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
        num_queries: int | None = None,
    ) -> Tensor:
        if num_queries is None:
            query, query_pos, query_ref = tokens, pos, reference_points
        else:
            query, query_pos, query_ref = (
                tokens[:, :num_queries],
                pos[:, :num_queries],
                reference_points[:, :num_queries],
            )
        if self._inference_path_applies(tokens, pos):
            out = self._forward_inference(query, query_pos, query_ref, tokens, spatial_shapes)
            return out if num_queries is None else torch.cat([out, tokens[:, num_queries:]], dim=1)
        attended = self.self_attn(query + query_pos, query_ref, tokens, spatial_shapes)
        out = self.norm1(query + self.dropout1(attended))
        out = self.norm2(out + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(out))))))
        if num_queries is None:
            return out
        return torch.cat([out, tokens[:, num_queries:]], dim=1)

    def _inference_path_applies(self, tokens: Tensor, pos: Tensor) -> bool:
        """fp32/fp64, dropout inactive, ReLU FFN, and :func:`fast_inference_allowed` (CPU, no autograd, no
        autocast, no hooks on the sub-modules): then :meth:`_forward_inference` computes the same function with
        fewer passes and allocations."""
        if tokens.dtype not in (torch.float32, torch.float64):
            return False
        if self.training and any(d.p > 0 for d in (self.dropout1, self.dropout2, self.dropout3)):
            return False
        if type(self.activation) is not nn.ReLU:
            return False
        return fast_inference_allowed(self, tokens, pos)

    def _forward_inference(
        self, query: Tensor, query_pos: Tensor, query_ref: Tensor, tokens: Tensor, spatial_shapes
    ) -> Tensor:
        """The post-norm layer without autograd (same arithmetic up to fp32 rounding order):

        - ``output_proj`` and the residual add are one GEMM (``addmm`` onto the queries), bias added after;
        - the FFN runs in row chunks through one reused hidden buffer (the (B*Q, 1024) hidden tensor is
          never materialised: no 73 MB allocation and page faults per layer at 800x1088, and the chunk
          stays in cache between the two GEMMs and the ReLU); ``linear2`` adds onto its residual likewise.
        """
        batch, queries, channels = query.shape
        sampled = self.self_attn.sample(query + query_pos, query_ref, tokens, spatial_shapes).view(-1, channels)
        out_proj = self.self_attn.output_proj
        hidden = torch.addmm(query.reshape(-1, channels), sampled, out_proj.weight.t())
        hidden.add_(out_proj.bias)
        hidden = F.layer_norm(hidden, (channels,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        out = sampled  # free now: receives hidden + FFN(hidden)
        rows = hidden.shape[0]
        chunk = max(1, min(rows, FFN_CHUNK_ROWS))
        buffer = hidden.new_empty(chunk, self.linear1.out_features)
        w1, b1, w2 = self.linear1.weight.t(), self.linear1.bias, self.linear2.weight.t()
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            inner = buffer[: stop - start]
            torch.addmm(b1, hidden[start:stop], w1, out=inner).relu_()
            torch.addmm(hidden[start:stop], inner, w2, out=out[start:stop])
        out.add_(self.linear2.bias)
        out = F.layer_norm(out, (channels,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        return out.view(batch, queries, channels)


_REFERENCE_POINTS_CACHE: dict[tuple, Tensor] = {}


def reference_points_for(shapes: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Deformable-DETR encoder reference points: normalized pixel centres of every token, repeated for
    every level (valid ratios are 1: Mask2Former never masks padding in the pixel decoder).

    Returns (B, S, L, 2) with (x, y) in (0, 1): a broadcast view (no copy) of a per-shape cached (S, 2)
    table, so callers must not write into it. The cache key includes inference mode because a tensor
    made under ``torch.inference_mode`` must not be reused by autograd-recording code.
    """
    key = (tuple(shapes), str(device), dtype, torch.is_inference_mode_enabled())
    ref = None if capturing() else _REFERENCE_POINTS_CACHE.get(key)  # (symbolic shapes: no cache)
    if ref is None:
        points = []
        for h, w in shapes:
            ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
        ref = torch.cat(points, 0).to(dtype)  # (S, 2)
        if capturing():
            return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)
        if len(_REFERENCE_POINTS_CACHE) >= 64:  # many input sizes (e.g. varying test images): start over
            _REFERENCE_POINTS_CACHE.clear()
        _REFERENCE_POINTS_CACHE[key] = ref
    return ref[None, :, None, :].expand(batch, -1, len(shapes), -1)


class SineLevelEmbedding(nn.Module):
    """Sine positional embedding + learned per-level embedding, flattened like the tokens.

    ``level_embed``: (L, C) parameter (Mask2Former's ``transformer.level_embed``).
    forward(feats [(B, C, H_l, W_l)]) -> (B, S, C), a batch-broadcast view (stride 0 over B) of one
    (S, C) table: the sine part of all levels is cached concatenated per shape, so a forward costs one
    add of the level embeddings (which must stay in the autograd graph) and no per-batch copy.
    """

    def __init__(self, d_model: int = 256, num_levels: int = 3) -> None:
        super().__init__()
        self.pos = PositionEmbeddingSine(d_model // 2)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        self._sine_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _sine_and_levels(self, shapes: tuple, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Cached (S, C) sine table of all levels and the (S,) level index of every token."""
        key = (shapes, str(device), dtype, torch.is_inference_mode_enabled())
        cached = None if capturing() else self._sine_cache.get(key)
        if cached is None:
            sine = [self.pos.embedding(h, w, device, dtype).flatten(1).transpose(0, 1) for h, w in shapes]
            levels = [
                torch.full((h * w,), level, device=device, dtype=torch.long) for level, (h, w) in enumerate(shapes)
            ]
            cached = (torch.cat(sine, 0), torch.cat(levels, 0))
            if capturing():
                return cached
            if len(self._sine_cache) >= 32:
                self._sine_cache.clear()
            self._sine_cache[key] = cached
        return cached

    def forward(self, feats: list[Tensor]) -> Tensor:
        shapes = tuple(spatial_size(f) for f in feats)
        sine, levels = self._sine_and_levels(shapes, feats[0].device, feats[0].dtype)
        pos = sine + self.level_embed.to(sine.dtype)[levels]  # (S, C)
        return pos[None].expand(feats[0].shape[0], -1, -1)


def reset_deformable_encoder_parameters(encoder: nn.Module) -> None:
    """Mask2Former's ``MSDeformAttnTransformerEncoderOnly`` init, shared by every deformable encoder:
    xavier-uniform on every parameter with more than one dimension, then each :class:`MSDeformAttn`'s own
    reset (zero offsets/weights with the ring bias), then a normal init of level embeddings."""
    for param in encoder.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)
    for module in encoder.modules():
        if isinstance(module, MSDeformAttn):
            module.reset_parameters()
        if isinstance(module, SineLevelEmbedding):
            nn.init.normal_(module.level_embed)
