"""Fast multi-scale deformable attention: bilinear corners folded into one weighted gather per level.

The reference kernel (``grid_sample`` per level, then stack, multiply by the attention weights and sum)
materialises every sampled value, (B*M, D, Q, L*P), several times over. Here the bilinear corner weights
are multiplied into the attention weights first and each level is one ``F.embedding_bag(mode="sum")``
call: every (batch, query, head) bag sums its 4*P weighted value rows, so nothing of size Q*L*P*D is
ever stored. Pure PyTorch, public ops only, any device.

Tricks, and why:
- Each level's values are copied once into a table with a zero border two pixels wide,
  (B, H+4, W+4, M, D). Pixel positions are clamped to [-2, W] x [-2, H], so every top-left corner lies in
  [-2, W] and all four corners inside the table: a point partly outside the map reads zeros for its
  outside corners, a point entirely outside (or clamped from far away) reads only zeros. That is
  ``grid_sample``'s zero padding exactly, with no per-point bounds test or validity mask, and the four
  corners of a point sit at fixed row offsets from its top-left corner.
- Sampling arithmetic runs in fp32 whatever the input dtype (bf16 values are gathered in fp32 and the
  result is cast back), so bf16 training keeps exact sampling positions.
- A custom backward (``_GatherDeformAttn``) keeps memory small: it saves only the padded table and the
  (small) locations and weights, recomputes the corner indices, and
  * scatters dL/dvalue with the same gather op run "transposed": points are sorted by their top-left
    row, so each table row becomes a bag of the query gradients that touch it (one sort of B*Q*M*P
    keys per level, then 4 gathers, one per corner offset);
  * gets dL/dlocation and dL/dweight from s_c = <dL/dout, corner value c> for the 4 corners of every
    point (one sparse sampled dense-dense product on CPU, chunked gather + ``bmm`` elsewhere), combined
    with the bilinear factors element-wise.
- :func:`ms_deform_attn_gather_from_offsets` is the entry :class:`MSDeformAttn` uses: it forms the pixel
  position ``ref * size - 0.5 + offset`` per level inside the kernel instead of materialising normalized
  locations (two slow broadcast passes forward and backward).

Shapes as in :mod:`proscale.models.ops.ms_deform_attn`: value (B, S, M, D), sampling_locations
(B, Q, M, L, P, 2) normalized (x, y), attention_weights (B, Q, M, L, P) -> (B, Q, M*D).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SpatialShapes = Sequence[tuple[int, int]]

# CPU: corner dots of the backward as one sparse sampled product (fastest there); tests switch it off to
# exercise the portable gather + bmm path that other devices use.
SPARSE_CORNER_DOTS_ON_CPU = True
# Bags per chunk in the non-CPU corner-dot gather (4096 bags * 16 corners * 32 ch = 8 MB of fp32).
_GRAD_CHUNK_BAGS = 4096


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Width of the zero border around each level's table (see the module docstring).
BORDER = 2


def _padded_table(level_value: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """(B, H*W, M, D) -> zero-bordered rows (B*(H+4)*(W+4)*M, D) in ``dtype``."""
    batch, _, heads, dim = level_value.shape
    b = BORDER
    table = level_value.new_empty(batch, height + 2 * b, width + 2 * b, heads, dim, dtype=dtype)
    # zero only the border (zero-filling the whole table first would write it twice)
    table[:, :b].zero_()
    table[:, -b:].zero_()
    table[:, b:-b, :b].zero_()
    table[:, b:-b, -b:].zero_()
    table[:, b:-b, b:-b] = level_value.view(batch, height, width, heads, dim)
    return table.view(-1, dim)


class _LevelCorners:
    """Top-left corner rows and bilinear factors of every sampling point of one level.

    All tensors are (B, Q, M, P). ``rows`` indexes the padded table of :func:`_padded_table`; the other
    corners are ``rows + corner_offsets``. ``fx``/``fy`` are the fractional positions of the clamped pixel
    position, ``weight`` the attention weight (outside corners read the zero border).
    """

    def __init__(
        self,
        positions: Tensor,
        weights: Tensor,
        height: int,
        width: int,
        dtype: torch.dtype,
        reference_points: Tensor | None = None,
    ) -> None:
        batch, _, heads, _ = weights.shape
        positions = positions.to(dtype)
        if reference_points is None:  # positions = normalized locations (B, Q, M, P, 2)
            # grid_sample (align_corners=False) unnormalizes g = 2*loc - 1 as (g + 1) * size / 2 - 0.5
            grid = positions * 2 - 1
            pix_x = (grid[..., 0] + 1) * (width / 2) - 0.5
            pix_y = (grid[..., 1] + 1) * (height / 2) - 0.5
        else:  # positions = offsets in pixels of this level, reference_points (B, Q, 2) normalized
            ref = reference_points.to(dtype)
            pix_x = positions[..., 0] + (ref[..., 0] * width - 0.5)[:, :, None, None]
            pix_y = positions[..., 1] + (ref[..., 1] * height - 0.5)[:, :, None, None]
        # Clamped into the zero border: a position more than a pixel outside the map (or infinite) becomes
        # one whose corners are all border zeros; positions that touch the map are unchanged.
        pix_x = pix_x.clamp_(-BORDER, width)
        pix_y = pix_y.clamp_(-BORDER, height)
        x0 = pix_x.floor()
        y0 = pix_y.floor()
        self.fx = pix_x.sub_(x0)
        self.fy = pix_y.sub_(y0)
        self.weight = weights.to(dtype)
        padded_width = width + 2 * BORDER
        rows_total = batch * (height + 2 * BORDER) * padded_width * heads
        index_dtype = torch.int32 if rows_total < 2**31 else torch.int64
        # clamp after the integer cast too, so NaN positions (NaN out) cannot index outside the table
        col = x0.to(index_dtype).clamp_(-BORDER, width).add_(BORDER)
        row = y0.to(index_dtype).clamp_(-BORDER, height).add_(BORDER)
        device = weights.device
        table_stride = (height + 2 * BORDER) * padded_width * heads
        head_base = torch.arange(heads, device=device, dtype=index_dtype).view(1, 1, heads, 1)
        batch_base = torch.arange(batch, device=device, dtype=index_dtype).view(batch, 1, 1, 1) * table_stride
        self.rows = row.mul_(padded_width * heads).add_(col.mul_(heads)).add_(head_base + batch_base)
        self.corner_offsets = (0, heads, padded_width * heads, (padded_width + 1) * heads)
        self.num_rows = rows_total

    def corner_weights(self, out: Tensor | None = None) -> list[Tensor]:
        """Weights of the corners (top-left, top-right, bottom-left, bottom-right), attention included.

        ``out``: optional (B*Q*M, 4, P) buffer; corner c is then written straight into ``out[:, c]``.
        """
        wy0 = (1 - self.fy) * self.weight
        wy1 = self.fy * self.weight
        wx0 = 1 - self.fx
        factors = [(wy0, wx0), (wy0, self.fx), (wy1, wx0), (wy1, self.fx)]
        if out is None:
            return [wy * wx for wy, wx in factors]
        points = self.fx.shape[-1]
        return [
            torch.mul(wy.reshape(-1, points), wx.reshape(-1, points), out=out[:, corner])
            for corner, (wy, wx) in enumerate(factors)
        ]


def _gather_level(table: Tensor, corners: _LevelCorners) -> Tensor:
    """Weighted sum over the 4*P corners of each (b, q, m) bag -> (B*Q*M, D).

    The bags' (4, P) corner indices and weights are written corner by corner into preallocated buffers
    (``out=`` slices): broadcasting a (4, 1) offset pattern over the P points, or multiplying (2, 1, P) by
    (1, 2, P) factors, runs TensorIterator loops only P = 4 long and is ~5x slower at these shapes."""
    rows = corners.rows
    points = rows.shape[-1]
    bags = rows.numel() // points
    top_left = rows.reshape(bags, points)
    indices = rows.new_empty(bags, 4, points)
    for corner, offset in enumerate(corners.corner_offsets):
        torch.add(top_left, offset, out=indices[:, corner])
    weights = corners.fx.new_empty(bags, 4, points)
    corners.corner_weights(out=weights)
    return F.embedding_bag(
        indices.view(bags, 4 * points), table, per_sample_weights=weights.view(bags, 4 * points), mode="sum"
    )


def _scatter_level_grad(grad_out: Tensor, corners: _LevelCorners) -> Tensor:
    """Transpose of :func:`_gather_level`: dL/dtable (num_rows, D) from dL/dout (B*Q*M, D)."""
    points = corners.rows.shape[-1]
    keys, order = torch.sort(corners.rows.reshape(-1), stable=True)
    starts = torch.arange(corners.num_rows, device=keys.device, dtype=keys.dtype)
    offsets = torch.searchsorted(keys, starts, out_int32=keys.dtype == torch.int32)
    bags = order.div(points, rounding_mode="floor").to(keys.dtype)  # the (b, q, m) bag of each point
    grad_table = grad_out.new_zeros(corners.num_rows, grad_out.shape[-1])
    for offset, weight in zip(corners.corner_offsets, corners.corner_weights()):
        per_row = F.embedding_bag(bags, grad_out, offsets, per_sample_weights=weight.reshape(-1)[order], mode="sum")
        grad_table[offset:] += per_row[: corners.num_rows - offset]
    return grad_table


def _corner_dots(table: Tensor, grad_out: Tensor, corners: _LevelCorners) -> Tensor:
    """s[n, p, c] = <dL/dout[n], table[rows[n, p] + corner_offsets[c]]> for every bag n, point p, corner c.

    On CPU this is one sampled dense-dense product (``torch.sparse.sampled_addmm``: a dot per stored
    entry, nothing of size n*P*4*D allocated); elsewhere the corner rows are gathered in chunks into a
    reused buffer and multiplied with ``bmm``.
    """
    points = corners.rows.shape[-1]
    rows = corners.rows.reshape(-1, points)
    bags, dim = rows.shape[0], table.shape[1]
    per_bag = 4 * points

    def corner_rows(block: Tensor) -> Tensor:  # (n, P) top-left rows -> (n*P*4,) rows of all corners
        return torch.stack([block + offset for offset in corners.corner_offsets], dim=-1).view(-1)

    if SPARSE_CORNER_DOTS_ON_CPU and table.device.type == "cpu":
        columns = corner_rows(rows)
        crow = torch.arange(0, bags * per_bag + 1, per_bag, dtype=columns.dtype, device=table.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(
                crow, columns, table.new_zeros(columns.shape[0]), size=(bags, table.shape[0])
            )
            dots = torch.sparse.sampled_addmm(pattern, grad_out, table.t(), beta=0.0)
        return dots.values().view(bags, points, 4)
    dots = table.new_empty(bags, per_bag)
    buffer = table.new_empty(_GRAD_CHUNK_BAGS * per_bag, dim)
    for start in range(0, bags, _GRAD_CHUNK_BAGS):
        chunk = slice(start, start + _GRAD_CHUNK_BAGS)
        columns = corner_rows(rows[chunk])
        gathered = torch.index_select(table, 0, columns, out=buffer[: columns.shape[0]])
        n = columns.shape[0] // per_bag
        torch.bmm(gathered.view(n, per_bag, dim), grad_out[chunk, :, None], out=dots[chunk].view(n, per_bag, 1))
    return dots.view(bags, points, 4)


def _point_grads(table: Tensor, grad_out: Tensor, corners: _LevelCorners) -> tuple[Tensor, Tensor, Tensor]:
    """dL/d(attention weight), dL/dfx, dL/dfy per point, each (B, Q, M, P).

    With s_c = <dL/dout, corner value c> (corners top-left, top-right, bottom-left, bottom-right):
    dL/da = sum_c bilinear_c * s_c, dL/dfx = a * [(1-fy)(s_tr - s_tl) + fy (s_br - s_bl)], dL/dfy likewise.
    """
    shape = corners.rows.shape
    s_tl, s_tr, s_bl, s_br = _corner_dots(table, grad_out, corners).view(*shape, 4).unbind(-1)
    fx, fy = corners.fx, corners.fy
    top = s_tl + (s_tr - s_tl) * fx  # sample along the top edge
    bottom = s_bl + (s_br - s_bl) * fx
    grad_weight = top + (bottom - top) * fy
    grad_fx = ((s_tr - s_tl) + ((s_br - s_bl) - (s_tr - s_tl)) * fy) * corners.weight
    grad_fy = (bottom - top) * corners.weight
    return grad_weight, grad_fx, grad_fy


class _GatherDeformAttn(torch.autograd.Function):
    """positions: normalized locations (B, Q, M, L, P, 2) when ``reference_points`` is None, else pixel
    offsets of each level added to ``reference_points`` (B, Q, L, 2) (normalized, no gradient)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, positions, attention_weights, reference_points=None):
        batch, _, heads, dim = value.shape
        queries = positions.shape[1]
        dtype = _compute_dtype(value.dtype)
        sizes = [h * w for h, w in spatial_shapes]
        tables = []
        out = None
        for level, (level_value, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
            table = _padded_table(level_value, h, w, dtype)
            corners = _level_corners(positions, attention_weights, reference_points, level, h, w, dtype)
            sampled = _gather_level(table, corners)
            out = sampled if out is None else out.add_(sampled)
            tables.append(table)
        ctx.spatial_shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        ctx.value_shape, ctx.value_dtype = value.shape, value.dtype
        ctx.has_reference = reference_points is not None
        extra = (reference_points,) if reference_points is not None else ()
        ctx.save_for_backward(positions, attention_weights, *extra, *tables)
        return out.view(batch, queries, heads * dim).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        positions, attention_weights, *rest = ctx.saved_tensors
        reference_points = rest.pop(0) if ctx.has_reference else None
        tables = rest
        batch, queries, heads, _, _, _ = positions.shape
        dim = ctx.value_shape[-1]
        dtype = tables[0].dtype
        grad_out = grad_output.reshape(batch * queries * heads, dim).to(dtype)
        need_value, _, need_pos, need_weight = ctx.needs_input_grad[:4]
        device = grad_out.device
        grad_value = torch.empty(ctx.value_shape, dtype=dtype, device=device) if need_value else None
        grad_pos = torch.empty(positions.shape, dtype=dtype, device=device) if need_pos else None
        grad_weight = torch.empty(attention_weights.shape, dtype=dtype, device=device) if need_weight else None
        start = 0
        for level, (h, w) in enumerate(ctx.spatial_shapes):
            corners = _level_corners(positions, attention_weights, reference_points, level, h, w, dtype)
            if need_value:
                b = BORDER
                grad_table = _scatter_level_grad(grad_out, corners).view(batch, h + 2 * b, w + 2 * b, heads, dim)
                grad_value[:, start : start + h * w] = grad_table[:, b:-b, b:-b].reshape(batch, h * w, heads, dim)
            if need_pos or need_weight:
                d_weight, d_fx, d_fy = _point_grads(tables[level], grad_out, corners)
                if need_weight:
                    grad_weight[:, :, :, level] = d_weight
                if need_pos:
                    # d pixel / d location = size (pixel = loc * size - 0.5); d pixel / d offset = 1
                    scale_x, scale_y = (1, 1) if ctx.has_reference else (w, h)
                    grad_pos[:, :, :, level, :, 0] = d_fx * scale_x
                    grad_pos[:, :, :, level, :, 1] = d_fy * scale_y
            start += h * w
        return (
            grad_value.to(ctx.value_dtype) if need_value else None,
            None,
            grad_pos.to(positions.dtype) if need_pos else None,
            grad_weight.to(attention_weights.dtype) if need_weight else None,
            None,
        )


def _level_corners(positions, attention_weights, reference_points, level, height, width, dtype) -> _LevelCorners:
    ref = None if reference_points is None else reference_points[:, :, level]
    return _LevelCorners(positions[:, :, :, level], attention_weights[:, :, :, level], height, width, dtype, ref)


def ms_deform_attn_gather(
    value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Fused-gather kernel (exact bilinear sampling with zero padding, align_corners=False).

    Args:
        value: (B, S, M, D), levels concatenated in ``spatial_shapes`` order.
        spatial_shapes: L (H_l, W_l) Python-int pairs.
        sampling_locations: (B, Q, M, L, P, 2) normalized (x, y).
        attention_weights: (B, Q, M, L, P).
    Returns:
        (B, Q, M*D) in ``value.dtype``.
    """
    return _GatherDeformAttn.apply(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_gather_from_offsets(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    reference_points: Tensor,
    pixel_offsets: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same kernel, fed the way :class:`MSDeformAttn` computes positions: reference point + offset in pixels.

    Equivalent to ``ms_deform_attn_gather(value, shapes, ref + offsets / (W_l, H_l), weights)`` but skips
    materialising the (B, Q, M, L, P, 2) normalized locations (two broadcast passes forward and backward):
    the pixel position ``ref * size - 0.5 + offset`` is formed per level inside the kernel. Equal up to
    fp32 rounding of the position (~1e-5 px at W = 136).

    Args:
        reference_points: (B, Q, L, 2) normalized (x, y); treated as a constant (no gradient).
        pixel_offsets: (B, Q, M, L, P, 2), in pixels of each level.
    """
    return _GatherDeformAttn.apply(value, spatial_shapes, pixel_offsets, attention_weights, reference_points.detach())
