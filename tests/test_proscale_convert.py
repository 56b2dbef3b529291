"""Official PRO-SCALE checkpoint import, on hand-made fake official state dicts.

The fake dicts are built from a reference model by renaming its tensors into the official detectron2
names (the inverse of the documented mapping) and giving them random values; converting and strictly
loading must put every official tensor back into the right parameter.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers.detectron2_names import TO_DETECTRON2

from proscale.convert.io import load_into
from proscale.convert.proscale_official import (
    infer_proscale_schedule,
    official_encoder_config,
    proscale_official_to_proscale,
)
from proscale.models.encoders import ProScaleEncoder
from proscale.models.pixel_decoder import PixelDecoder

D = 32
HEADS, POINTS = 4, 2
PD = "sem_seg_head.pixel_decoder."
IN_CHANNELS = {"res2": 8, "res3": 16, "res4": 24, "res5": 40}


def pixel_decoder(schedule, layout="released", lpe=True) -> PixelDecoder:
    encoder = ProScaleEncoder(
        d_model=D, schedule=schedule, n_heads=HEADS, n_points=POINTS, dim_feedforward=64, trc_layout=layout
    )
    return PixelDecoder(IN_CHANNELS, encoder, conv_dim=D, mask_dim=D, lpe=lpe)


# our pixel-decoder name -> official name (inverse of the documented mapping)
OFFICIAL_PIXEL_DECODER_NAMES = [
    (r"encoder\.embed\.level_embed", "transformer.level_embed"),
    (r"encoder\.trc\.linear\.(\w+)", r"transformer.encoder.token_excite.ops.\1"),
    (r"encoder\.layers\.(.+)", r"transformer.encoder.layers.\1"),
    (r"(adapter_1|layer_1)\.0\.weight", r"\1.weight"),
    (r"(adapter_1|layer_1)\.1\.(\w+)", r"\1.norm.\2"),
    (r"(input_proj\..+|mask_features\..+)", r"\1"),
]


def official_name(ours: str, rules) -> str:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, ours):
            return re.sub(pattern, replacement, ours)
    raise AssertionError(f"no official name for {ours}")


def fake_official_pixel_decoder(schedule, lpe=True) -> tuple[dict, dict]:
    """(official state dict with random values, {official name: our name})."""
    reference = pixel_decoder(schedule, lpe=lpe)
    official, names = {}, {}
    for ours, value in reference.state_dict().items():
        name = PD + official_name(ours, OFFICIAL_PIXEL_DECODER_NAMES)
        official[name] = torch.randn_like(value)
        names[name] = "pixel_decoder." + ours
    return official, names


class PixelDecoderHolder(torch.nn.Module):
    """Puts the pixel decoder under the ``pixel_decoder.`` prefix the converter produces."""

    def __init__(self, decoder: PixelDecoder) -> None:
        super().__init__()
        self.pixel_decoder = decoder


@pytest.mark.parametrize("schedule", [(3, 3, 3), (1, 1, 1), (2, 0, 1), (1, 3, 1)])
def test_fake_official_checkpoint_round_trip(schedule):
    official, names = fake_official_pixel_decoder(schedule)
    # the official file has TRC and only the norm of layer_1 (LPE)
    assert PD + "transformer.encoder.token_excite.ops.weight" in official
    assert PD + "layer_1.norm.weight" in official and PD + "layer_1.weight" not in official
    assert infer_proscale_schedule(official, HEADS, POINTS) == schedule

    converted = proscale_official_to_proscale(official, schedule=schedule, n_heads=HEADS, n_points=POINTS)
    model = PixelDecoderHolder(pixel_decoder(schedule))
    report = load_into(model, converted)  # strict: raises on missing / unused / mis-shaped keys
    assert report.ok
    state = model.state_dict()
    for name, value in official.items():
        torch.testing.assert_close(state[names[name]], value, rtol=0, atol=0)
    # flat indices are kept: official layer k is our layer k, in the stage the schedule gives it
    encoder = model.pixel_decoder.encoder
    for k, layer in enumerate(encoder.layers):
        official_w = official[f"{PD}transformer.encoder.layers.{k}.self_attn.sampling_offsets.weight"]
        torch.testing.assert_close(layer.self_attn.sampling_offsets.weight, official_w, rtol=0, atol=0)
        assert layer.self_attn.n_levels == encoder.stage_of_layer[k] + 1
    torch.testing.assert_close(encoder.trc.linear.weight, official[PD + "transformer.encoder.token_excite.ops.weight"])


def test_official_encoder_config_reads_the_checkpoint():
    official, _ = fake_official_pixel_decoder((1, 3, 1))
    config = official_encoder_config(official, HEADS, POINTS)
    assert config == {
        "schedule": [1, 3, 1],
        "trc": True,
        "trc_layout": "released",
        "trc_temperature": 0.1,
        "residual": False,
        "lpe": True,
    }
    no_lpe, _ = fake_official_pixel_decoder((1, 1, 1), lpe=False)
    assert official_encoder_config(no_lpe, HEADS, POINTS)["lpe"] is False


def test_released_layout_is_needed_to_reproduce_outputs():
    """The same official weights give different outputs in the paper layout: importing must use released."""
    official, _ = fake_official_pixel_decoder((1, 1, 1))
    converted = proscale_official_to_proscale(official, n_heads=HEADS, n_points=POINTS)
    released = PixelDecoderHolder(pixel_decoder((1, 1, 1), layout="released"))
    paper = PixelDecoderHolder(pixel_decoder((1, 1, 1), layout="paper"))
    load_into(released, converted)
    load_into(paper, converted)
    features = {k: torch.randn(1, c, 64 // s, 96 // s) for (k, c), s in zip(IN_CHANNELS.items(), (4, 8, 16, 32))}
    with torch.no_grad():
        a = released.pixel_decoder(features).multi_scale_features[0]
        b = paper.pixel_decoder(features).multi_scale_features[0]
    assert not torch.allclose(a, b, atol=1e-4)


def test_schedule_mismatch_is_a_clear_error():
    official, _ = fake_official_pixel_decoder((3, 3, 3))
    with pytest.raises(ValueError, match=r"checkpoint has PRO-SCALE schedule \[3, 3, 3\] .* built with \[1, 1, 1\]"):
        proscale_official_to_proscale(official, schedule=(1, 1, 1), n_heads=HEADS, n_points=POINTS)


def test_strict_load_names_missing_trc_when_model_has_none():
    official, _ = fake_official_pixel_decoder((1, 1, 1))
    converted = proscale_official_to_proscale(official, n_heads=HEADS, n_points=POINTS)
    no_trc = ProScaleEncoder(
        d_model=D, schedule=(1, 1, 1), n_heads=HEADS, n_points=POINTS, dim_feedforward=64, trc=False
    )
    model = PixelDecoderHolder(PixelDecoder(IN_CHANNELS, no_trc, conv_dim=D, mask_dim=D, lpe=True))
    with pytest.raises(ValueError, match=r"pixel_decoder\.encoder\.trc\.linear\.weight"):
        load_into(model, converted)


def _layer_key(k: int) -> str:
    return f"{PD}transformer.encoder.layers.{k}.self_attn.sampling_offsets.weight"


@pytest.mark.parametrize(
    "levels, message",
    [
        ([], "not a PRO-SCALE checkpoint"),
        ([3, 2, 3], "not a PRO-SCALE schedule"),
        ([1, 2], "not a PRO-SCALE schedule"),
        ([1, 4, 3], "not a PRO-SCALE schedule"),
    ],
)
def test_infer_schedule_rejects_non_proscale_layouts(levels, message):
    state = {_layer_key(k): torch.zeros(HEADS * n * POINTS * 2, D) for k, n in enumerate(levels)}
    state["backbone.x"] = torch.zeros(1)
    with pytest.raises(ValueError, match=message):
        infer_proscale_schedule(state, HEADS, POINTS)


def test_infer_schedule_rejects_gaps_and_odd_sizes():
    with pytest.raises(ValueError, match="gaps"):
        infer_proscale_schedule({_layer_key(0): torch.zeros(16, D), _layer_key(2): torch.zeros(48, D)}, HEADS, POINTS)
    with pytest.raises(ValueError, match="not a multiple"):
        infer_proscale_schedule({_layer_key(0): torch.zeros(17, D)}, HEADS, POINTS)


def test_m2f_checkpoint_reads_as_last_stage_only():
    """An M2F checkpoint (6 layers, 3 levels) is PRO-SCALE (0, 0, 6) without TRC."""
    state = {_layer_key(k): torch.zeros(HEADS * 3 * POINTS * 2, D) for k in range(6)}
    assert infer_proscale_schedule(state, HEADS, POINTS) == (0, 0, 6)


def test_convolutional_trc_is_rejected():
    official, _ = fake_official_pixel_decoder((1, 1, 1))
    official[PD + "transformer.encoder.token_excite.ops.weight"] = torch.zeros(1, D, 1, 1)
    with pytest.raises(ValueError, match="convolutional TRC"):
        proscale_official_to_proscale(official, n_heads=HEADS, n_points=POINTS)


def test_fake_official_full_model_checkpoint_loads_strictly():
    """A whole official-layout checkpoint (detectron2 ResNet, PRO-SCALE pixel decoder with TRC + LPE,
    M2F predictor, pixel_mean/std buffers) converts and loads into our Mask2Former with nothing missing
    or unused, and the model then runs."""
    from proscale.models.backbones import build_backbone
    from proscale.models.mask2former import Mask2Former

    def build(**encoder_kwargs):
        encoder = ProScaleEncoder(d_model=D, n_heads=HEADS, n_points=POINTS, dim_feedforward=64, **encoder_kwargs)
        return Mask2Former(
            build_backbone("timm", model_name="resnet18"),
            encoder,
            num_classes=3,
            conv_dim=D,
            mask_dim=D,
            lpe=True,
            num_queries=4,
            dec_layers=3,
            hidden_dim=D,
            dim_feedforward=64,
            nheads=HEADS,
        )

    reference = build(schedule=(2, 1, 1))
    official = {"pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)}
    for ours, value in reference.state_dict().items():
        if ours.endswith("num_batches_tracked"):
            continue  # detectron2's FrozenBN has no step counter
        if ours.startswith("pixel_decoder."):
            name = PD + official_name(ours[len("pixel_decoder.") :], OFFICIAL_PIXEL_DECODER_NAMES)
        else:
            pattern, replacement = next((p, r) for p, r in TO_DETECTRON2 if re.fullmatch(p, ours))
            name = re.sub(pattern, replacement, ours)
        official[name] = torch.rand_like(value) if "running_var" in ours else torch.randn_like(value) * 0.1

    config = official_encoder_config(official, HEADS, POINTS)
    lpe = config.pop("lpe")
    assert lpe and config["schedule"] == [2, 1, 1]
    model = build(**config).eval()
    report = load_into(model, proscale_official_to_proscale(official, n_heads=HEADS, n_points=POINTS))
    assert report.ok
    assert model.pixel_decoder.encoder.trc.layout == "released"
    torch.testing.assert_close(
        model.backbone.body.layer2[0].conv1.weight, official["backbone.res3.0.conv1.weight"], rtol=0, atol=0
    )
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out["pred_logits"].shape == (1, 4, 4) and torch.isfinite(out["pred_masks"]).all()


def test_convert_script_handles_official_checkpoints(tmp_path, capsys, monkeypatch):
    """scripts/convert_weights.py --format proscale renames the file and prints the overrides that rebuild it."""
    import importlib.util
    import sys

    monkeypatch.setattr(sys.modules[__name__], "HEADS", 8)  # the script reads the released 8 heads x 4 points
    monkeypatch.setattr(sys.modules[__name__], "POINTS", 4)
    official, names = fake_official_pixel_decoder((1, 3, 1))
    src, out = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save({"model": official}, src)
    spec = importlib.util.spec_from_file_location(
        "convert_weights", Path(__file__).parents[1] / "scripts/convert_weights.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--src", str(src), "--format", "proscale", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model.encoder.schedule=[1,3,1]" in printed and "model.lpe=true" in printed
    assert "model.encoder.trc_layout=released" in printed
    converted = torch.load(out)
    assert sorted(converted) == sorted(names.values())
    for name, ours in names.items():
        torch.testing.assert_close(converted[ours], official[name])
