"""The shared deformable-attention op against a naive per-point loop, and its gradients."""

import pytest
import torch

from proscale.models.ops import MSDeformAttn
from proscale.models.ops.ms_deform_attn import ms_deform_attn


def naive_ms_deform_attn(value, shapes, locations, weights):
    """Bilinear sampling point by point (zero outside, pixel centres at (i + 0.5) / size)."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    v = value[b, starts[lvl] : starts[lvl + 1], m].view(h, w, dim)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                        acc = torch.zeros(dim, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                acc = acc + (1 - abs(x - xx)) * (1 - abs(y - yy)) * v[yy, xx]
                        out[b, q, m] += weights[b, q, m, lvl, p] * acc
    return out.flatten(2)


def random_inputs(levels, batch=2, queries=5, heads=2, dim=4, points=3, dtype=torch.float32):
    shapes = [(7 - lvl, 5 + lvl) for lvl in range(levels)]
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, levels, points, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, shapes, locations, weights


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_reference_op_matches_naive_loop(levels):
    value, shapes, locations, weights = random_inputs(levels)
    expected = naive_ms_deform_attn(value, shapes, locations, weights)
    got = ms_deform_attn(value, shapes, locations, weights, impl="grid_sample")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reference_op_gradcheck_float64():
    value, shapes, locations, weights = random_inputs(
        2, batch=1, queries=2, heads=1, dim=2, points=2, dtype=torch.float64
    )
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl="grid_sample"), inputs, eps=1e-6, atol=1e-4
    )


def test_module_initialisation_matches_deformable_detr():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 points along +x, head 2 along +y; point k is scaled by k+1; levels share the ring
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(bias[2, 1, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.all(attn.attention_weights.weight == 0) and torch.all(attn.sampling_offsets.weight == 0)


def test_module_rejects_wrong_level_count():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with pytest.raises(ValueError, match="2 levels"):
        attn(torch.randn(1, 3, 16), torch.rand(1, 3, 1, 2), torch.randn(1, 4, 16), [(2, 2)])
