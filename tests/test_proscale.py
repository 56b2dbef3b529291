"""PRO-SCALE: stage semantics (hooks), TRC layouts on hand-built cases, equality with a transcription of
the official control flow, no redundant concatenations / host syncs, and bad configurations."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from proscale.models.encoders import ENCODERS, ProScaleEncoder, TokenRecalibration
from proscale.models.encoders.base import flatten_levels, reference_points_for

D_MODEL = 32
SMALL = {"d_model": D_MODEL, "n_heads": 4, "dim_feedforward": 64}


def feature_maps(batch: int = 2, coarse: tuple[int, int] = (2, 3), channels: int = D_MODEL):
    h, w = coarse
    return [torch.randn(batch, channels, h * s, w * s) for s in (1, 2, 4)]


def level_sizes(feats):
    return [f.shape[-2] * f.shape[-1] for f in feats]


# ----------------------------------------------------------------------------- stage semantics


def record_layer_inputs(encoder: ProScaleEncoder) -> list[dict]:
    """Hooks on every layer's deformable attention: query count, value count, levels, ref-point levels."""
    seen: list[dict] = []
    for index, layer in enumerate(encoder.layers):

        def hook(module, args, index=index):
            query, reference_points, value, shapes = args[:4]
            seen.append(
                {
                    "layer": index,
                    "queries": query.shape[1],
                    "values": value.shape[1],
                    "levels": len(shapes),
                    "ref_levels": reference_points.shape[2],
                    "module_levels": module.n_levels,
                }
            )

        layer.self_attn.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("schedule", [(1, 1, 1), (3, 1, 2), (2, 2, 2)])
def test_stage_semantics_with_hooks(schedule):
    encoder = ProScaleEncoder(schedule=schedule, **SMALL)
    assert len(encoder.layers) == sum(schedule)
    feats = feature_maps()
    n5, n4, n3 = level_sizes(feats)
    seen = record_layer_inputs(encoder)
    encoder(feats)
    expected = (
        [{"queries": n5, "values": n5, "levels": 1, "ref_levels": 1, "module_levels": 1}] * schedule[0]
        + [{"queries": n5 + n4, "values": n5 + n4, "levels": 2, "ref_levels": 2, "module_levels": 2}] * schedule[1]
        + [{"queries": n5 + n4 + n3, "values": n5 + n4 + n3, "levels": 3, "ref_levels": 3, "module_levels": 3}]
        * schedule[2]
    )
    assert [{k: v for k, v in s.items() if k != "layer"} for s in seen] == expected
    assert [s["layer"] for s in seen] == list(range(sum(schedule)))  # flat order = execution order


def test_schedule_111_has_three_layers_one_per_stage():
    encoder = ProScaleEncoder(schedule=[1, 1, 1], **SMALL)
    assert len(encoder.layers) == 3
    assert encoder.stage_of_layer == [0, 1, 2]
    assert [layer.self_attn.n_levels for layer in encoder.layers] == [1, 2, 3]
    assert [len(encoder.stage_layers(s)) for s in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("schedule", [(0, 2, 1), (2, 0, 1), (0, 0, 3)])
def test_zero_stage_is_skipped(schedule):
    encoder = ProScaleEncoder(schedule=schedule, **SMALL)
    feats = feature_maps()
    seen = record_layer_inputs(encoder)
    out = encoder(feats)
    levels_run = [s["levels"] for s in seen]
    assert levels_run == [1] * schedule[0] + [2] * schedule[1] + [3] * schedule[2]
    assert [o.shape for o in out] == [f.shape for f in feats]


def test_stage_positional_embedding_and_reference_points_are_prefixes():
    """Each stage uses the first tokens of the embedding built once for all tokens."""
    encoder = ProScaleEncoder(schedule=[1, 1, 1], **SMALL)
    feats = feature_maps()
    full_pos = encoder.embed(feats)
    shapes = [tuple(f.shape[-2:]) for f in feats]
    full_ref = reference_points_for(shapes, 2, torch.device("cpu"), torch.float32)
    captured = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda m, args: captured.append((args[1], args[2], args[3])))
    encoder(feats)
    for stage, (pos, ref, stage_shapes) in enumerate(captured):
        length = pos.shape[1]
        torch.testing.assert_close(pos, full_pos[:, :length], rtol=0, atol=0)
        torch.testing.assert_close(ref, full_ref[:, :length, : stage + 1], rtol=0, atol=0)
        assert list(stage_shapes) == shapes[: stage + 1]


def test_coarse_levels_only_see_coarse_tokens_in_early_stages():
    """With TRC off, the stage-1 output (seen by a hook) depends on s5 only: changing s4 and s3 leaves it
    unchanged."""
    encoder = ProScaleEncoder(schedule=[1, 1, 1], trc=False, **SMALL)
    stage1_out = []
    encoder.layers[0].register_forward_hook(lambda m, args, out: stage1_out.append(out))
    feats = feature_maps()
    encoder(feats)
    feats2 = [feats[0], torch.randn_like(feats[1]), torch.randn_like(feats[2])]
    encoder(feats2)
    torch.testing.assert_close(stage1_out[0], stage1_out[1])


# ----------------------------------------------------------------------------- TRC


def make_trc(channels: int, layout: str, weight: list[float], bias: float = 0.0, temperature: float = 1.0):
    trc = TokenRecalibration(channels, temperature=temperature, layout=layout)
    with torch.no_grad():
        trc.linear.weight.copy_(torch.tensor([weight]))
        trc.linear.bias.fill_(bias)
    return trc


def test_trc_paper_layout_gates_by_spatially_corresponding_neighbourhood():
    """s3 is 4x8, targets 2x4 (s4) and 1x2 (s5). With w = e_0, b = 0, tau = 1 the gate of a target cell is
    sigmoid(mean of s3 channel 0 over the cells under it): bilinear (align_corners=False) downsampling by
    2 averages the 2x2 block, by 4 averages the central 2x2 of the 4x4 block."""
    s3 = torch.zeros(1, 2, 4, 8)
    s3[0, 0] = torch.arange(32, dtype=torch.float32).view(4, 8) / 8.0
    s3[0, 1] = 100.0  # channel 1 has weight 0: must not matter
    trc = make_trc(2, "paper", [1.0, 0.0])
    ch0 = s3[0, 0]
    expected_s4 = torch.stack([ch0[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean() for i in range(2) for j in range(4)])
    expected_s5 = torch.stack([ch0[1:3, 4 * j + 1 : 4 * j + 3].mean() for j in range(2)])
    torch.testing.assert_close(trc.gate(trc.arrange(s3), (2, 4))[0, :, 0], expected_s4.sigmoid())
    torch.testing.assert_close(trc.gate(trc.arrange(s3), (1, 2))[0, :, 0], expected_s5.sigmoid())
    # forward multiplies each target token (row-major (i, j) order) by its own gate
    s4 = torch.ones(1, 8, 2) * torch.arange(1, 9, dtype=torch.float32)[None, :, None]
    s5 = torch.full((1, 2, 2), 3.0)
    gated5, gated4 = trc([s5, s4], [(1, 2), (2, 4)], s3)
    torch.testing.assert_close(gated4, s4 * expected_s4.sigmoid()[None, :, None])
    torch.testing.assert_close(gated5, s5 * expected_s5.sigmoid()[None, :, None])


def test_trc_released_layout_known_answer():
    """C = 2, s3 is 2x2 with tokens t0..t3 (row-major). The official ``view(-1, C, H, W)`` puts
    [t0, t1] (both channels) in channel 0 and [t2, t3] in channel 1; resizing 2x2 -> 1x1 averages
    each channel. With w = (1, 0): released gate = sigmoid(mean(t0, t1)), paper gate = sigmoid(mean of
    channel 0 of t0..t3)."""
    tokens = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])  # (N3=4, C=2)
    s3 = tokens.t().reshape(1, 2, 2, 2)  # the (B, C, H, W) map of these tokens
    released = make_trc(2, "released", [1.0, 0.0])
    paper = make_trc(2, "paper", [1.0, 0.0])
    torch.testing.assert_close(released.gate(released.arrange(s3), (1, 1)).flatten(), torch.tensor([2.5]).sigmoid())
    torch.testing.assert_close(paper.gate(paper.arrange(s3), (1, 1)).flatten(), torch.tensor([4.0]).sigmoid())


def official_trc(linear, temperature, curr, prev, curr_shape, prev_shape):
    """Transcription of the official TRC (is_conv=False), literal reshapes included."""
    batch, length, channels = curr.shape
    prev = prev.view(-1, channels, prev_shape[0], prev_shape[1])
    resized = F.interpolate(prev, size=list(curr_shape), mode="bilinear", align_corners=False)
    resized = resized.reshape((batch, length, channels))
    return curr * torch.sigmoid(temperature * linear(resized))


@pytest.mark.parametrize("coarse", [(2, 3), (3, 2)])
def test_trc_released_layout_matches_official_reshape(coarse):
    feats = feature_maps(batch=2, coarse=coarse)
    tokens, shapes = flatten_levels(feats)
    s5, s4, s3 = tokens.split(level_sizes(feats), dim=1)  # non-contiguous slices, as in the official code
    trc = TokenRecalibration(D_MODEL, temperature=0.1, layout="released")
    gated = trc([s5, s4], shapes[:2], feats[2])
    for got, target, shape in zip(gated, (s5, s4), shapes[:2]):
        expected = official_trc(trc.linear, 0.1, target, s3, shape, shapes[2])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    paper = TokenRecalibration(D_MODEL, temperature=0.1, layout="paper")
    paper.load_state_dict(trc.state_dict())
    assert not torch.allclose(paper([s4], shapes[1:2], feats[2])[0], gated[1])


def test_trc_shared_by_both_targets_and_finest_not_gated():
    encoder = ProScaleEncoder(schedule=[1, 1, 1], **SMALL)
    assert sum(isinstance(m, TokenRecalibration) for m in encoder.modules()) == 1
    assert [tuple(p.shape) for p in encoder.trc.parameters()] == [(1, D_MODEL), (1,)]
    calls = []
    encoder.trc.register_forward_pre_hook(
        lambda m, args: calls.append(([t.shape[1] for t in args[0]], list(args[1]), args[2].shape))
    )
    feats = feature_maps()
    encoder(feats)
    n5, n4, _ = level_sizes(feats)
    # one call gates s5 and s4 together, from the s3 input map; s3 itself is not a target
    assert calls == [([n5, n4], [tuple(feats[0].shape[-2:]), tuple(feats[1].shape[-2:])], feats[2].shape)]


# ----------------------------------------------------------------------------- official control flow


def official_forward(encoder: ProScaleEncoder, feats, residual: bool):
    """Transcription of the official ``PyramidMSDeformAttnTransformerEncoder.forward`` (3 levels, TRC with
    the released reshape) driving our layers: split, gate, clone, per-stage loops, residuals, concat."""
    tokens, shapes = flatten_levels(feats)
    batch = tokens.shape[0]
    pos = encoder.embed(feats)
    ref = reference_points_for(shapes, batch, tokens.device, tokens.dtype)
    n5, n4, n3 = level_sizes(feats)
    p1, p2, p3 = encoder.schedule
    out5, out4, out3 = tokens.split([n5, n4, n3], dim=1)
    lin, tau = encoder.trc.linear, encoder.trc.temperature
    out5 = official_trc(lin, tau, out5, out3, shapes[0], shapes[2])
    pred5 = out5.clone()
    for idx in range(p1):
        pred5 = encoder.layers[idx](pred5, pos[:, :n5], ref[:, :n5, :1], shapes[:1])
        if residual:
            pred5 += out5
    out4 = official_trc(lin, tau, out4, out3, shapes[1], shapes[2])
    pred54 = torch.cat([pred5, out4], dim=1).clone()
    for idx in range(p2):
        pred54 = encoder.layers[p1 + idx](pred54, pos[:, : n5 + n4], ref[:, : n5 + n4, :2], shapes[:2])
        if residual:
            pred54 += torch.cat([out5, out4], dim=1)
    pred = torch.cat([pred54, out3], dim=1)
    for idx in range(p3):
        pred = encoder.layers[p1 + p2 + idx](pred, pos, ref, shapes)
    return pred


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("schedule", [(1, 1, 1), (2, 1, 2), (0, 2, 1), (0, 0, 1)])
def test_released_layout_equals_official_control_flow(schedule, residual):
    encoder = ProScaleEncoder(schedule=schedule, trc_layout="released", residual=residual, **SMALL)
    feats = feature_maps()
    expected = official_forward(encoder, feats, residual)
    got, _ = flatten_levels(encoder(feats))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_trc_off_equals_plain_staging_and_temperature_matters():
    feats = feature_maps()
    torch.manual_seed(1)
    on = ProScaleEncoder(schedule=[1, 1, 1], trc=True, **SMALL)
    off = ProScaleEncoder(schedule=[1, 1, 1], trc=False, **SMALL)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("trc.")})
    assert not torch.allclose(on(feats)[0], off(feats)[0])
    with torch.no_grad():
        on.trc.linear.weight.zero_()
        on.trc.linear.bias.fill_(1e4)  # gate = sigmoid(huge) = 1: TRC becomes the identity
    for a, b in zip(on(feats), off(feats)):
        torch.testing.assert_close(a, b)


def test_schedule_333_with_full_last_stage_equals_m2f_layers():
    """(0, 0, p3) without TRC is M2F with p3 layers: same weights -> same outputs."""
    feats = feature_maps()
    pro = ProScaleEncoder(schedule=[0, 0, 2], trc=False, **SMALL)
    m2f = ENCODERS.build("m2f", num_layers=2, **SMALL)
    m2f.load_state_dict(pro.state_dict())
    for a, b in zip(pro(feats), m2f(feats)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- efficiency contracts


def count_cats_in_proscale(encoder, feats) -> int:
    """torch.cat calls made directly from proscale.py during one forward."""
    original = torch.cat
    calls = []

    def counting_cat(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith("encoders/proscale.py"):
            calls.append(1)
        return original(*args, **kwargs)

    torch.cat = counting_cat
    try:
        encoder(feats)
    finally:
        torch.cat = original
    return len(calls)


@pytest.mark.parametrize(
    "schedule, residual, expected",
    [((1, 1, 1), False, 2), ((3, 3, 3), False, 2), ((0, 0, 1), False, 1), ((2, 0, 1), False, 1), ((1, 1, 1), True, 3)],
)
def test_one_concat_per_stage_boundary(schedule, residual, expected):
    encoder = ProScaleEncoder(schedule=schedule, residual=residual, **SMALL)
    assert count_cats_in_proscale(encoder, feature_maps()) == expected


def test_forward_makes_no_host_sync(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in forward")

    encoder = ProScaleEncoder(schedule=[1, 1, 1], **SMALL)
    feats = feature_maps()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = encoder(feats)
    monkeypatch.undo()
    assert torch.isfinite(torch.stack([o.sum() for o in out])).all()


# ----------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"schedule": [1, -1, 1]}, "negative entry"),
        ({"schedule": [1, 1, 0]}, r"last stage needs >= 1 layer \(p3 = 0\)"),
        ({"schedule": [1, 1]}, r"has 2 entries; it needs one per level \(3\)"),
        ({"schedule": [1, 1, 1, 1, 1], "num_levels": None}, "1 to 4 entries"),
        ({"schedule": [1, "a", 1]}, "must contain integers"),
        ({"schedule": [1.5, 1, 1]}, "must contain integers"),
        ({"schedule": 3}, "must be a list"),
        ({"schedule": [2], "num_levels": None, "trc": True}, "trc=true needs >= 2 levels"),
        ({"trc_layout": "official"}, r"TRC layout must be one of \['paper', 'released'\]"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    params = {**SMALL, "num_levels": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        ProScaleEncoder(**params)


def test_single_level_without_trc_is_allowed():
    encoder = ProScaleEncoder(schedule=[2], trc=False, **SMALL)
    out = encoder([torch.randn(1, D_MODEL, 3, 4)])
    assert out[0].shape == (1, D_MODEL, 3, 4)


def test_schedule_from_omegaconf_list():
    from omegaconf import OmegaConf

    encoder = ProScaleEncoder(schedule=OmegaConf.create([3, 1, 1]), **SMALL)
    assert encoder.schedule == (3, 1, 1) and len(encoder.layers) == 5
