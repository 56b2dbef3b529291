"""The inference fast paths (no autograd) against the module paths that training uses.

Fast paths: ``proscale.models.ops.fpn_tail`` (pixel decoder input projections, stride-4 tail, mask
projection), ``MSDeformAttn._sample_inference`` (fused offset/attention projection), and
``DeformableEncoderLayer._forward_inference`` (output projection + residual in one GEMM, chunked FFN).
They run only when nothing needs a gradient; the references below are the same modules run with autograd
recording, i.e. the training path. Stated tolerances: each fast op / layer within 1e-5 absolute of the
module path in fp32 (values of magnitude ~1-5); the separable max-pool bit-exact; whole pixel decoders
equal to 1e-10 in float64 (same function) and, in fp32, no less accurate than the module path against
the float64 result (rounding of a multi-layer composition is ~1e-5 in either path).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import proscale.models.encoders.base as encoder_base
import proscale.models.ops.fpn_tail as fpn_tail_module
from proscale.models.encoders import ENCODERS
from proscale.models.encoders.base import DeformableEncoderLayer, reference_points_for
from proscale.models.ops import MSDeformAttn
from proscale.models.ops.fpn_tail import fpn_tail, max_pool3x3
from proscale.models.pixel_decoder import PixelDecoder

TOL = 1e-5


def perturb_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial weights everywhere (the inits leave offsets, norms and biases at trivial values)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.GroupNorm, nn.LayerNorm)):
                sub.weight.copy_(1 + 0.3 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.3 * torch.randn(sub.bias.shape, generator=generator))
        for name, param in module.named_parameters():
            if "sampling_offsets" in name or "attention_weights" in name or name.endswith(".bias"):
                if "norm" not in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return module


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Replace ``owner.name`` by a counting wrapper; returns the one-element call counter."""
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


# --- separable max-pool -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 5, 7, 9), (1, 4, 13, 2), (1, 1, 1, 6), (2, 3, 6, 1)])
def test_max_pool3x3_is_bit_exact(shape):
    x = torch.randn(shape)
    x.view(-1)[::7] = float("-inf")
    x.view(-1)[::11] = float("nan")
    expected = F.max_pool2d(x, 3, 1, 1)
    assert torch.equal(max_pool3x3(x).isnan(), expected.isnan())
    assert torch.equal(max_pool3x3(x).nan_to_num(), expected.nan_to_num())


# --- stride-4 tail ----------------------------------------------------------------------------------------


def tail_modules(lpe: bool, channels: int, in_channels: int, generator: torch.Generator):
    adapter = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.GroupNorm(8, channels))
    smooth = nn.MaxPool2d(3, 1, 1) if lpe else nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    layer_1 = nn.Sequential(smooth, nn.GroupNorm(8, channels), nn.ReLU())
    return perturb_(adapter, generator), perturb_(layer_1, generator)


@pytest.mark.parametrize("lpe", [True, False], ids=["lpe", "conv"])
@pytest.mark.parametrize("chunk_bytes", [1, 2**30], ids=["one-group-chunks", "one-chunk"])
def test_fpn_tail_matches_modules(lpe, chunk_bytes, monkeypatch):
    monkeypatch.setattr(fpn_tail_module, "CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    adapter, layer_1 = tail_modules(lpe, 32, 24, gen)
    # non-zero means and unequal scales: the GroupNorm statistics must not rely on centred inputs
    res2 = torch.randn(2, 24, 18, 22, generator=gen) * 2 + 1.5
    coarse = torch.randn(2, 9 * 11, 32, generator=gen).transpose(1, 2).reshape(2, 32, 9, 11)  # channels-last view
    expected = layer_1(adapter(res2) + F.interpolate(coarse, size=(18, 22), mode="bilinear", align_corners=False))
    with torch.no_grad():
        got = fpn_tail(res2, coarse, adapter, layer_1)
    torch.testing.assert_close(got, expected.detach(), atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_in_place_conv1x1_matches_conv2d(bias):
    gen = torch.Generator().manual_seed(4)
    conv = perturb_(nn.Conv2d(16, 16, 1, bias=bias), gen)
    x = torch.randn(2, 16, 5, 9, generator=gen)
    expected = conv(x).detach()
    with torch.no_grad():
        got = fpn_tail_module.conv1x1_(x.clone(), conv, block_columns=7)  # 45 columns: 6 full blocks + 3
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(fpn_tail_module.conv1x1(x, conv), expected, atol=TOL, rtol=0)


def tiny_pixel_decoder(encoder_name: str, lpe: bool) -> PixelDecoder:
    kwargs = {"d_model": 64, "n_heads": 4, "dim_feedforward": 96}
    if encoder_name == "proscale":
        kwargs["schedule"] = [1, 1, 2]
    else:
        kwargs["num_layers"] = 2
    encoder = ENCODERS.build(encoder_name, **kwargs)
    decoder = PixelDecoder({"res2": 24, "res3": 40, "res4": 48, "res5": 56}, encoder, conv_dim=64, mask_dim=64, lpe=lpe)
    return perturb_(decoder, torch.Generator().manual_seed(1)).eval()


def features(batch: int = 2, size: tuple[int, int] = (96, 128)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    h, w = size
    chans = {"res2": (24, 4), "res3": (40, 8), "res4": (48, 16), "res5": (56, 32)}
    return {k: torch.randn(batch, c, -(-h // s), -(-w // s), generator=gen) for k, (c, s) in chans.items()}


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over the mask features and the multi-scale maps of two decoder outputs (in fp64)."""
    pairs = [(a.mask_features, b.mask_features), *zip(a.multi_scale_features, b.multi_scale_features)]
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in pairs)


@pytest.mark.parametrize("encoder_name", ["m2f", "proscale"])
@pytest.mark.parametrize("lpe", [True, False], ids=["lpe", "conv"])
def test_pixel_decoder_fast_path_computes_the_training_path_function(encoder_name, lpe, monkeypatch):
    """Same function: in float64 the fast and module paths agree to 1e-10. In fp32 the composition of a
    few perturbed deformable layers amplifies rounding to ~1e-5 in either path (the module path itself is
    up to ~4e-5 from the float64 result here), so fp32 is checked against the float64 result: the fast
    path must be no less accurate than the module path (within 2x), and within 1e-4 of it (HF parity's bar).
    """
    decoder = tiny_pixel_decoder(encoder_name, lpe)
    feats = features(size=(64, 104))
    tail_calls = count_calls(monkeypatch, fpn_tail_module, "fpn_tail")
    monkeypatch.setattr("proscale.models.pixel_decoder.fpn_tail", fpn_tail_module.fpn_tail)
    layer_calls = count_calls(monkeypatch, DeformableEncoderLayer, "_forward_inference")
    module64 = copy.deepcopy(decoder).double()
    feats64 = {k: v.double() for k, v in feats.items()}
    expected64 = module64(feats64)  # autograd recording: the module path
    assert expected64.mask_features.requires_grad and tail_calls[0] == 0 and layer_calls[0] == 0
    with torch.no_grad():
        got64 = module64(feats64)
    assert tail_calls[0] == 1 and layer_calls[0] == len(decoder.encoder.layers)
    assert max_abs_diff(got64, expected64) < 1e-10

    expected = decoder(feats)
    with torch.no_grad():
        got = decoder(feats)
    module_error, fast_error = max_abs_diff(expected, expected64), max_abs_diff(got, expected64)
    assert fast_error <= 2 * max(module_error, 1e-6), (fast_error, module_error)
    assert max_abs_diff(got, expected) < 1e-4


def test_pixel_decoder_inference_mode_and_frozen_weights_use_fast_path(monkeypatch):
    decoder = tiny_pixel_decoder("proscale", lpe=True)
    feats = features(batch=1)
    calls = count_calls(monkeypatch, fpn_tail_module, "fpn_tail")
    monkeypatch.setattr("proscale.models.pixel_decoder.fpn_tail", fpn_tail_module.fpn_tail)
    with torch.no_grad():
        expected = decoder(feats).mask_features
    with torch.inference_mode():
        torch.testing.assert_close(decoder(feats).mask_features, expected, atol=0, rtol=0)
    decoder.requires_grad_(False)  # grad mode on but nothing requires grad: still the fast path
    torch.testing.assert_close(decoder(feats).mask_features, expected, atol=0, rtol=0)
    assert calls[0] == 3


def test_pixel_decoder_gradients_unchanged_by_fast_path(monkeypatch):
    """Training (grad recording) runs the modules, never the fast tail, and its gradients are the function's own:
    every parameter's gradient equals that of a float64 copy (the same function) to fp32 rounding."""
    decoder = tiny_pixel_decoder("m2f", lpe=True).train()
    reference = copy.deepcopy(decoder).double()
    feats = features(batch=1, size=(64, 64))

    def refuse(*args, **kwargs):
        raise AssertionError("the inference fast path ran while autograd was recording")

    monkeypatch.setattr("proscale.models.pixel_decoder.fpn_tail", refuse)
    decoder(feats).mask_features.square().mean().backward()
    reference({k: v.double() for k, v in feats.items()}).mask_features.square().mean().backward()
    named_reference = dict(reference.named_parameters())
    for name, param in decoder.named_parameters():
        expected = named_reference[name].grad
        assert param.grad is not None and expected is not None, name
        scale = float(expected.abs().max())
        assert scale > 0, f"{name}: zero gradient, nothing compared"
        assert float((param.grad.double() - expected).abs().max()) <= 1e-3 * scale + 1e-7, name


# --- deformable attention and encoder layers -----------------------------------------------------------


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_msdeformattn_inference_path_matches_training_path(levels):
    gen = torch.Generator().manual_seed(levels)
    attn = perturb_(MSDeformAttn(d_model=32, n_levels=levels, n_heads=4, n_points=3), gen)
    shapes = [(9 - 2 * lvl, 7 + lvl) for lvl in range(levels)]
    total = sum(h * w for h, w in shapes)
    query, values = torch.randn(2, 13, 32, generator=gen), torch.randn(2, total, 32, generator=gen)
    ref = torch.rand(2, 13, levels, 2, generator=gen) * 1.2 - 0.1
    expected = attn(query, ref, values, shapes)
    assert expected.requires_grad
    with torch.no_grad():
        assert attn._inference_path_applies(query, ref, values)
        got = attn(query, ref, values, shapes)
    torch.testing.assert_close(got, expected.detach(), atol=TOL, rtol=0)


def test_msdeformattn_reference_kernel_never_takes_the_inference_path():
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2, impl="grid_sample")
    with torch.no_grad():
        assert not attn._inference_path_applies(torch.randn(1, 3, 16), torch.rand(1, 3, 1, 2), torch.randn(1, 4, 16))


@pytest.mark.parametrize("chunk_rows", [7, 4096])
@pytest.mark.parametrize("num_queries", [None, 30])
def test_encoder_layer_inference_matches_training_path(chunk_rows, num_queries, monkeypatch):
    monkeypatch.setattr(encoder_base, "FFN_CHUNK_ROWS", chunk_rows)
    gen = torch.Generator().manual_seed(3)
    layer = perturb_(DeformableEncoderLayer(d_model=32, n_levels=2, n_heads=4, n_points=2, dim_feedforward=48), gen)
    shapes = [(5, 6), (10, 12)]
    tokens = torch.randn(2, 150, 32, generator=gen) * 1.5 + 0.5
    pos = torch.randn(2, 150, 32, generator=gen)
    ref = reference_points_for(shapes, 2, tokens.device, tokens.dtype)
    expected = layer(tokens, pos, ref, shapes, num_queries=num_queries)
    with torch.no_grad():
        got = layer(tokens, pos, ref, shapes, num_queries=num_queries)
    torch.testing.assert_close(got, expected.detach(), atol=TOL, rtol=0)


def test_encoder_layer_with_active_dropout_keeps_the_module_path():
    layer = DeformableEncoderLayer(d_model=16, n_levels=1, n_heads=2, n_points=2, dim_feedforward=32, dropout=0.1)
    tokens = torch.randn(1, 12, 16)
    with torch.no_grad():
        assert not layer.train()._inference_path_applies(tokens, tokens)
        assert layer.eval()._inference_path_applies(tokens, tokens)


def test_fast_paths_keep_state_dict_keys():
    decoder = tiny_pixel_decoder("proscale", lpe=True)
    keys = set(decoder.state_dict())
    with torch.no_grad():
        decoder(features(batch=1))
    assert set(decoder.state_dict()) == keys
    assert {"layer_1.1.weight", "layer_1.1.bias"} <= keys and not any(k.startswith("layer_1.0") for k in keys)
