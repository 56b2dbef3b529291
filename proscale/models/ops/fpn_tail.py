"""Inference-only fast path of the pixel decoder's stride-4 tail (no autograd, CPU, fp32/fp64).

The tail computes, on the largest map of the model (B, C, H/4, W/4):

    x = GroupNorm(conv1x1(res2)) + bilinear_upsample(e3)        (adapter_1 + FPN top-down add)
    y = ReLU(GroupNorm(smooth(x)))                              (layer_1; smooth = 3x3 max-pool or 3x3 conv)

Run module by module this is a dozen passes over a 55 MB tensor at 800x1088, and each fresh tensor of
that size costs ~35 ms of page faults on CPU (glibc maps it anew), more than the pass itself. Here the
same arithmetic runs in place, channel chunk by channel chunk (one or more whole GroupNorm groups, a
couple of MB, so the passes stay in cache):

- GroupNorm as two-pass statistics: mean, subtract it in place, sum of squares of the centred values
  (as accurate as the fused kernel, no cancellation), then one ``addcmul`` for scale and shift.
- the upsample writes into a reused chunk buffer (``out=``) from a contiguous copy of e3 (the encoder's
  output is a channels-last view, for which the bilinear kernel is ~4x slower).
- the 3x3 stride-1 max-pool is separable: a horizontal then a vertical 3-wide max, each two
  ``torch.maximum(..., out=...)`` on shifted views; bit-exact to ``F.max_pool2d`` (max is exact).

Only ``out=`` / in-place ops are used, so this path is for ``torch.no_grad`` / inference; the pixel
decoder keeps the plain modules whenever autograd is recording. Results equal the module path within
fp32 rounding (GEMM and reduction order), tested in ``tests/test_fast_paths.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Bytes of one channel chunk (whole GroupNorm groups): small enough to stay in L2/L3 across the passes.
CHUNK_BYTES = 2 * 1024 * 1024


def max_pool3x3_into(src: Tensor, tmp: Tensor, dst: Tensor) -> Tensor:
    """``dst = max_pool2d(src, 3, stride=1, padding=1)`` for (N, H, W) tensors, via ``tmp`` (same shape).

    ``src`` is only read; ``tmp`` and ``dst`` must not overlap it or each other. Bit-exact (NaN propagates
    like ``max_pool2d``). Returns ``dst``.
    """
    # horizontal 3-max: tmp[j] = max(src[j-1], src[j], src[j+1]), missing neighbours ignored at the edges
    torch.maximum(src[..., :-1], src[..., 1:], out=tmp[..., :-1])
    tmp[..., -1:].copy_(src[..., -1:])
    torch.maximum(tmp[..., 1:], src[..., :-1], out=tmp[..., 1:])
    # vertical 3-max of the horizontal result
    torch.maximum(tmp[:, :-1], tmp[:, 1:], out=dst[:, :-1])
    dst[:, -1:].copy_(tmp[:, -1:])
    torch.maximum(dst[:, 1:], tmp[:, :-1], out=dst[:, 1:])
    return dst


def max_pool3x3(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, 1, 1)`` of a (B, C, H, W) tensor without autograd (separable, bit-exact)."""
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        return F.max_pool2d(x, 3, 1, 1)
    src = x.reshape(-1, *x.shape[-2:])
    out = torch.empty_like(src)
    return max_pool3x3_into(src, torch.empty_like(src), out).view(x.shape)


def _centre_and_rstd_(groups: Tensor, eps: float, scratch: Tensor) -> Tensor:
    """Subtract each row's mean from ``groups`` (G, n) in place; return 1/sqrt(biased var + eps), (G,).

    Two-pass (mean, then the sum of squares of the centred values, squared into ``scratch`` of the same
    numel and summed by the cascaded reduction): ``vector_norm`` and ``bmm`` dots accumulate too
    naively (1e-5 relative error at 435k elements per group), ``var`` (Welford) is 10x slower.
    """
    groups.sub_(groups.mean(1, keepdim=True))
    squares = torch.mul(groups, groups, out=scratch.view(groups.shape))
    return squares.sum(1).div_(groups.shape[1]).add_(eps).rsqrt_()


def _normed_scale(x: Tensor, norm: nn.GroupNorm, first: int, scratch: Tensor) -> tuple[Tensor, Tensor | None]:
    """Centre ``x`` (c, H, W), channels ``first..first+c`` of ``norm`` (whole groups), per group in place;
    return the per-channel scale (c,) and shift (c,) or None that complete GN(x) = x * scale + shift."""
    channels = x.shape[0]
    per_group = norm.num_channels // norm.num_groups
    scale = _centre_and_rstd_(x.view(channels // per_group, -1), norm.eps, scratch).repeat_interleave(per_group)
    if not norm.affine:
        return scale, None
    return scale * norm.weight[first : first + channels], norm.bias[first : first + channels]


def group_norm_(x: Tensor, norm: nn.GroupNorm, first: int, scratch: Tensor, relu: bool = False) -> Tensor:
    """In place: ``x`` (c, H, W), channels ``first..first+c`` of ``norm`` -> GroupNorm(x), then ReLU if asked.
    ``scratch``: any tensor of ``x.numel()`` elements (overwritten)."""
    scale, shift = _normed_scale(x, norm, first, scratch)
    if shift is None:
        x.mul_(scale[:, None, None])
    else:
        torch.addcmul(shift[:, None, None], x, scale[:, None, None], out=x)
    return x.relu_() if relu else x


def conv1x1(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 stride-1 ``conv`` of (B, C_in, H, W) as one GEMM per image ``W @ x[b]`` (no autograd).

    ``F.conv2d`` runs 1x1 convolutions ~30 % slower on CPU (its im2col-free path still packs the input).
    """
    batch, in_channels, height, width = x.shape
    channels = conv.out_channels
    out = x.new_empty(batch, channels, height, width)
    weight = conv.weight.view(channels, in_channels)
    for b in range(batch):
        torch.mm(weight, x[b].reshape(in_channels, height * width), out=out[b].view(channels, height * width))
    if conv.bias is not None:
        out.add_(conv.bias[:, None, None])
    return out


def conv1x1_(x: Tensor, conv: nn.Conv2d, block_columns: int = 1024) -> Tensor:
    """``conv(x)`` written over ``x`` itself (B, C, H, W), C_in == C_out, ``x`` contiguous; no autograd.

    Column block by column block: ``W @ x[:, block]`` goes to a small reused buffer and is copied back
    (with the bias) over the block it was computed from, which no later block reads. Saves allocating
    the output, which for the stride-4 mask projection is a fresh 55 MB at 800x1088 (~35 ms of page
    faults on CPU), and the separate bias pass.
    """
    batch, channels, height, width = x.shape
    plane = height * width
    weight = conv.weight.view(channels, channels)
    block = min(block_columns, plane)
    buffer = x.new_empty(channels, block)
    bias = None if conv.bias is None else conv.bias[:, None]
    for b in range(batch):
        image = x[b].view(channels, plane)
        for start in range(0, plane, block):
            stop = min(start + block, plane)
            product = torch.mm(weight, image[:, start:stop], out=buffer[:, : stop - start])
            if bias is None:
                image[:, start:stop].copy_(product)
            else:
                torch.add(product, bias, out=image[:, start:stop])
    return x


def conv1x1_group_norm(x: Tensor, conv: nn.Conv2d, norm: nn.GroupNorm) -> Tensor:
    """``norm(conv(x))`` (the pixel decoder's input projections) without autograd, normalized in place."""
    out = conv1x1(x, conv)
    scratch = torch.empty_like(out[0])
    for b in range(out.shape[0]):
        group_norm_(out[b], norm, 0, scratch)
    return out


def _chunk_channels(channels: int, per_group: int, plane: int, itemsize: int) -> int:
    groups_per_chunk = max(1, CHUNK_BYTES // max(1, per_group * plane * itemsize))
    return min(channels, groups_per_chunk * per_group)


def fpn_tail(
    res2: Tensor,
    coarse: Tensor,
    adapter: nn.Sequential,
    layer_1: nn.Sequential,
) -> Tensor:
    """The stride-4 tail without autograd: ``layer_1(adapter(res2) + upsample(coarse))``, (B, C, H, W).

    Args:
        res2: (B, C_in, H, W) backbone features at stride 4.
        coarse: (B, C, h, w) the encoder's finest output (any strides).
        adapter: ``Sequential(Conv2d 1x1, GroupNorm)`` (the pixel decoder's ``adapter_1``).
        layer_1: ``Sequential(MaxPool2d(3, 1, 1) or Conv2d 3x3, GroupNorm, ReLU)``.
    """
    conv, norm_in = adapter
    smooth, norm_out = layer_1[0], layer_1[1]
    batch, _, height, width = res2.shape
    channels = conv.out_channels
    plane = height * width
    # the 1x1 conv's output is the buffer the whole tail works in, and finally returns
    lateral = conv1x1(res2, conv)
    coarse = coarse.contiguous()
    per_group = norm_in.num_channels // norm_in.num_groups
    if norm_out.num_channels // norm_out.num_groups != per_group:
        raise ValueError("fpn_tail needs the same GroupNorm grouping in adapter_1 and layer_1")
    chunk = _chunk_channels(channels, per_group, plane, lateral.element_size())
    pool = isinstance(smooth, nn.MaxPool2d) and height > 1 and width > 1
    up = lateral.new_empty(1, chunk, height, width)
    tmp = lateral.new_empty(chunk, height, width)
    for b in range(batch):
        for first in range(0, channels, chunk):
            last = min(first + chunk, channels)
            lat, scratch = lateral[b, first:last], tmp[: last - first]
            scale, shift = _normed_scale(lat, norm_in, first, scratch)
            fused = up[:, : last - first]
            torch._C._nn.upsample_bilinear2d(coarse[b : b + 1, first:last], (height, width), False, out=fused)
            fused = fused[0]
            fused.addcmul_(lat, scale[:, None, None])
            if shift is not None:
                fused.add_(shift[:, None, None])
            if pool:  # lat (free now) receives the pooled map, then the second GroupNorm + ReLU
                max_pool3x3_into(fused, scratch, lat)
                group_norm_(lat, norm_out, first, scratch, relu=True)
            else:
                lat.copy_(fused)
    if pool:
        return lateral
    smoothed = smooth(lateral)
    for b in range(batch):
        for first in range(0, channels, chunk):
            last = min(first + chunk, channels)
            group_norm_(smoothed[b, first:last], norm_out, first, tmp[: last - first], relu=True)
    return smoothed


__all__ = [
    "CHUNK_BYTES",
    "conv1x1",
    "conv1x1_",
    "conv1x1_group_norm",
    "fpn_tail",
    "group_norm_",
    "max_pool3x3",
    "max_pool3x3_into",
]
