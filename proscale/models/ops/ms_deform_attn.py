"""Multi-scale deformable attention (Deformable DETR), pure PyTorch.

This is the one deformable-attention op of the project: every encoder (M2F, PRO-SCALE, Lite-M2F)
uses :class:`MSDeformAttn`. The sampling kernel is chosen by ``impl``:

- ``"gather"`` (the default): bilinear corner weights folded into the attention weights, one weighted
  ``embedding_bag`` gather per level and a memory-light custom backward
  (:mod:`proscale.models.ops.ms_deform_attn_gather`); exact to the reference within fp32 rounding,
  sampling arithmetic in fp32 for bf16/fp16 inputs; on CPU at Mask2Former shapes 6-10x faster forward,
  5-7x faster forward+backward and ~4x less peak memory than the reference (``benchmarks/RESULTS.md``).
- ``"grid_sample"``: the reference (per-level ``F.grid_sample``, stack, weight, sum), kept for tests and
  as the baseline for benchmarks.

Without autograd (CPU, ``gather`` kernel), :class:`MSDeformAttn` computes the sampling offsets and the
attention logits with one GEMM of the two stacked weight matrices, the offset rows reordered so that
every (coordinate, level) is a contiguous block (bit-identical results, parameters unchanged).

More kernels can be added with :func:`register_impl` and chosen per module (``impl=``) or process-wide
(:func:`set_default_impl`).

Shapes (B batch, Q queries, S = sum_l H_l*W_l value tokens, M heads, D = C/M head dim,
L levels, P points per level and head):

- ``value``: (B, S, M, D), levels concatenated in ``spatial_shapes`` order
- ``spatial_shapes``: L pairs of Python ints (H_l, W_l) -- ints, so no host sync is ever needed
- ``sampling_locations``: (B, Q, M, L, P, 2), (x, y) normalized to [0, 1] (pixel centres at (i+0.5)/W)
- ``attention_weights``: (B, Q, M, L, P), already normalized over L*P
- returns (B, Q, M*D)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proscale.models.ops.graph_capture import sizes_tensor
from proscale.models.ops.inference_gate import fast_inference_allowed
from proscale.models.ops.ms_deform_attn_gather import ms_deform_attn_gather, ms_deform_attn_gather_from_offsets

SpatialShapes = Sequence[tuple[int, int]]


def ms_deform_attn_grid_sample(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Reference implementation: bilinear ``grid_sample`` per level (zero padding, align_corners=False)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # (B, Q, M, P, 2) -> (B*M, Q, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, D, Q, P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Q)
    return out.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous()


_IMPLS: dict[str, Callable[..., Tensor]] = {
    "grid_sample": ms_deform_attn_grid_sample,
    "gather": ms_deform_attn_gather,
}
_DEFAULT_IMPL = "gather"


def register_impl(name: str, fn: Callable[..., Tensor]) -> None:
    """Add a kernel ``fn(value, spatial_shapes, sampling_locations, attention_weights) -> (B, Q, M*D)``."""
    _IMPLS[name] = fn


def available_impls() -> list[str]:
    return sorted(_IMPLS)


def set_default_impl(name: str) -> None:
    """Select the kernel used by every :class:`MSDeformAttn` whose ``impl`` is None."""
    global _DEFAULT_IMPL
    if name not in _IMPLS:
        raise ValueError(f"unknown deformable-attention impl {name!r}; valid choices: {sorted(_IMPLS)}")
    _DEFAULT_IMPL = name


def get_default_impl() -> str:
    return _DEFAULT_IMPL


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str | None = None,
) -> Tensor:
    """Dispatch to the selected kernel; see the module docstring for shapes."""
    name = impl or _DEFAULT_IMPL
    if name not in _IMPLS:
        raise ValueError(f"unknown deformable-attention impl {name!r}; valid choices: {sorted(_IMPLS)}")
    return _IMPLS[name](value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with Deformable-DETR's initialisation.

    Args:
        d_model: channels C of queries and values.
        n_levels: number of feature levels L the queries may sample from.
        n_heads: attention heads M (C must be divisible by M).
        n_points: sampling points P per head and level.
        impl: kernel name (None = the process-wide default, see :func:`set_default_impl`).
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, impl: str | None = None
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 1 <= n_levels:
            raise ValueError(f"n_levels must be >= 1, got {n_levels}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        ring = torch.stack([thetas.cos(), thetas.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True)[0]
        ring = ring.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        ring = ring * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (B, Q, C), positional embedding already added.
            reference_points: (B, Q, L, 2) normalized (x, y) in [0, 1].
            value_input: (B, S, C) with S = sum of H_l*W_l over ``spatial_shapes``.
            spatial_shapes: L (H_l, W_l) Python-int pairs; L must equal ``n_levels``.
            value_padding_mask: optional (B, S) bool, True = padded token (zeroed).
        Returns:
            (B, Q, C)
        """
        return self.output_proj(self.sample(query, reference_points, value_input, spatial_shapes, value_padding_mask))

    def sample(
        self,
        query: Tensor,
        reference_points: Tensor,
        value_input: Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward` without the final ``output_proj``: the attended values (B, Q, C), heads concatenated.

        (Encoder layers use it to fold ``output_proj`` and the residual add into one GEMM at inference.)
        """
        batch, queries, _ = query.shape
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels got {len(spatial_shapes)} shapes")
        if self._inference_path_applies(query, reference_points, value_input):
            return self._sample_inference(query, reference_points, value_input, spatial_shapes, value_padding_mask)
        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(batch, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, queries, self.n_heads, self.n_levels, self.n_points)
        if (self.impl or _DEFAULT_IMPL) == "gather" and not reference_points.requires_grad:
            # the fast kernel forms ref * size + offset per level itself (no normalized-location tensor)
            return ms_deform_attn_gather_from_offsets(value, spatial_shapes, reference_points, offsets, weights)
        # offsets are in pixels of each level: divide by (W_l, H_l)
        normalizer = sizes_tensor(spatial_shapes, offsets)  # (L, 2)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return ms_deform_attn(value, spatial_shapes, locations, weights, impl=self.impl)

    def _inference_path_applies(self, query: Tensor, reference_points: Tensor, value_input: Tensor) -> bool:
        """The default ``gather`` kernel and :func:`fast_inference_allowed` (CPU, no autograd, no autocast, no
        hooks): then :meth:`_sample_inference` computes the same values with one fused projection GEMM and a
        faster position layout."""
        if (self.impl or _DEFAULT_IMPL) != "gather":
            return False
        return fast_inference_allowed(self, query, value_input, reference_points)

    def _fused_projection(self) -> tuple[Tensor, Tensor]:
        """``sampling_offsets`` and ``attention_weights`` stacked into one (N_off + N_att, C) weight and bias,
        the offset rows reordered from (head, level, point, xy) to (xy, level, head, point): the GEMM
        output then holds each (coordinate, level) as a (heads * points)-wide contiguous block, which the
        sampling kernel's per-level arithmetic reads without short strided inner loops."""
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        order = torch.arange(heads * levels * points * 2).view(heads, levels, points, 2).permute(3, 1, 0, 2).flatten()
        order = order.to(self.sampling_offsets.weight.device)
        weight = torch.cat((self.sampling_offsets.weight[order], self.attention_weights.weight))
        bias = torch.cat((self.sampling_offsets.bias[order], self.attention_weights.bias))
        return weight, bias

    def _sample_inference(self, query, reference_points, value_input, spatial_shapes, value_padding_mask) -> Tensor:
        batch, queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill_(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.d_model // heads)
        projected = F.linear(query, *self._fused_projection())
        num_offsets = heads * levels * points * 2
        # (B, Q, xy, L, M, P) block layout viewed as the kernel's (B, Q, M, L, P, xy)
        offsets = projected[..., :num_offsets].view(batch, queries, 2, levels, heads, points).permute(0, 1, 4, 3, 5, 2)
        logits = projected[..., num_offsets:].view(batch, queries, heads, levels * points)
        weights = _small_softmax_(logits.contiguous()).view(batch, queries, heads, levels, points)
        return ms_deform_attn_gather_from_offsets(value, spatial_shapes, reference_points, offsets, weights)


def _small_softmax_(logits: Tensor) -> Tensor:
    """``logits.softmax(-1)`` computed in place, for a short last dim (the L*P <= 16 logits of one head).

    Same formula as torch's kernel (exp(x - max) / sum), but each step is a vectorised pass over the whole
    tensor: torch's softmax kernel loops over rows of 12 one by one and is ~4x slower at this shape
    (17,850 queries x 8 heads: ~40 ms vs ~10 ms on one CPU thread).
    """
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(-1, keepdim=True))
