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


# --- the fast "gather" kernel (the default) against the reference --------------------------------------

import proscale.models.ops.ms_deform_attn_gather as gather_kernel  # noqa: E402
from proscale.models.ops.ms_deform_attn import (  # noqa: E402
    available_impls,
    get_default_impl,
    set_default_impl,
)


def random_case(levels, batch, heads, dim, points, queries, generator, dtype=torch.float32):
    """Random level sizes (incl. 1-pixel maps), locations up to half a map outside [0, 1]."""
    shapes = [tuple(int(s) for s in torch.randint(1, 12, (2,), generator=generator)) for _ in range(levels)]
    total = sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * 2 - 0.5
    weights = torch.rand(batch, queries, heads, levels * points, generator=generator, dtype=dtype).softmax(-1)
    return value, shapes, locations, weights.view(batch, queries, heads, levels, points)


def values_and_grads(impl, value, shapes, locations, weights, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], impl=impl)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


def test_gather_is_the_default_and_impls_are_selectable():
    assert get_default_impl() == "gather"
    assert {"gather", "grid_sample"} <= set(available_impls())
    with pytest.raises(ValueError, match="valid choices"):
        set_default_impl("nope")
    with pytest.raises(ValueError, match="valid choices"):
        ms_deform_attn(*random_inputs(1), impl="nope")


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_gather_matches_naive_loop(levels):
    value, shapes, locations, weights = random_inputs(levels)
    expected = naive_ms_deform_attn(value, shapes, locations, weights)
    got = ms_deform_attn(value, shapes, locations, weights, impl="gather")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparse_dots", [True, False], ids=["cpu-sparse-dots", "portable-dots"])
@pytest.mark.parametrize("seed", range(6))
def test_gather_values_and_grads_match_reference(seed, sparse_dots, monkeypatch):
    """Random shapes, 1-4 levels, batch 1-3: values and all three gradients within 1e-5 (fp32)."""
    monkeypatch.setattr(gather_kernel, "SPARSE_CORNER_DOTS_ON_CPU", sparse_dots)
    monkeypatch.setattr(gather_kernel, "_GRAD_CHUNK_BAGS", 5)  # several chunks even on tiny inputs
    gen = torch.Generator().manual_seed(seed)
    levels = seed % 4 + 1
    batch, heads, dim, points, queries = (
        int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 4), (1, 4), (1, 9), (1, 5), (1, 30))
    )
    value, shapes, locations, weights = random_case(levels, batch, heads, dim, points, queries, gen)
    grad_out = torch.randn(batch, queries, heads * dim, generator=gen)
    ref_out, ref_grads = values_and_grads("grid_sample", value, shapes, locations, weights, grad_out)
    out, grads = values_and_grads("gather", value, shapes, locations, weights, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, got, expected in zip(("value", "locations", "weights"), grads, ref_grads):
        # location gradients scale with the map size (d pixel / d location = W), hence rtol
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"grad {name}")


def test_gather_gradcheck_float64():
    """Batch 2, 3 small levels (one 1-pixel wide), points partly outside the maps."""
    shapes = [(2, 3), (3, 1), (1, 2)]
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(2, 11, 2, 2, generator=gen, dtype=torch.float64)
    locations = torch.rand(2, 3, 2, 3, 2, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(2, 3, 2, 3, 2, generator=gen, dtype=torch.float64)
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl="gather"), inputs, eps=1e-6, atol=1e-5, fast_mode=True
    )


def test_gather_points_far_outside_give_zero_and_no_error():
    value, shapes, locations, weights = random_inputs(2)
    for far in (-3.0, 5.0, 1e10, float("inf"), float("-inf")):  # zero padding, no index error
        out = ms_deform_attn(value, shapes, torch.full_like(locations, far), weights, impl="gather")
        assert torch.equal(out, torch.zeros_like(out)), far


@pytest.mark.parametrize("levels", [1, 3])
def test_gather_bf16_close_to_fp32_reference(levels):
    """bf16 inputs: sampling runs in fp32, so the only error is bf16 rounding of inputs/outputs.

    Stated tolerance: values and gradients within 1e-2 * max|reference| of the fp32 reference computed on
    the same (bf16-rounded) inputs; the bf16 grid_sample reference is typically ~5x further off.
    """
    gen = torch.Generator().manual_seed(levels)
    value, shapes, locations, weights = random_case(levels, 2, 4, 8, 4, 40, gen)
    value, locations, weights = (t.bfloat16() for t in (value, locations, weights))
    grad_out = torch.randn(2, 40, 32, generator=gen).bfloat16()
    ref_out, ref_grads = values_and_grads(
        "grid_sample", value.float(), shapes, locations.float(), weights.float(), grad_out.float()
    )
    out, grads = values_and_grads("gather", value, shapes, locations, weights, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    for got, expected in zip([out, *grads], [ref_out, *ref_grads]):
        tol = 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


def test_module_gives_same_result_with_both_impls():
    torch.manual_seed(1)
    shapes = [(3, 5), (6, 4)]
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    with torch.no_grad():  # non-trivial offsets and weights
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    query, values = torch.randn(2, 7, 16), torch.randn(2, 39, 16)
    ref = torch.rand(2, 7, 2, 2)
    results = []
    for impl in ("grid_sample", "gather"):
        attn.impl = impl
        attn.zero_grad()
        out = attn(query, ref, values, shapes)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in attn.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for g_ref, g_fast in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)


def test_gather_from_pixel_offsets_equals_gather_from_locations():
    """MSDeformAttn's fast entry (reference point + pixel offsets) = the location interface, grads included."""
    gen = torch.Generator().manual_seed(7)
    value, shapes, _, weights = random_case(3, 2, 2, 4, 3, 6, gen)
    ref = torch.rand(2, 6, 3, 2, generator=gen)
    offsets = torch.randn(2, 6, 2, 3, 3, 2, generator=gen) * 3
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(1, 1, 1, 3, 1, 2)
    off_leaf, loc_leaf = offsets.clone().requires_grad_(), (ref[:, :, None, :, None] + offsets / size).requires_grad_()
    out_off = gather_kernel.ms_deform_attn_gather_from_offsets(value, shapes, ref, off_leaf, weights)
    out_loc = gather_kernel.ms_deform_attn_gather(value, shapes, loc_leaf, weights)
    torch.testing.assert_close(out_off, out_loc, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out_off)
    out_off.backward(grad)
    out_loc.backward(grad)
    torch.testing.assert_close(off_leaf.grad, loc_leaf.grad / size, atol=1e-5, rtol=1e-4)
