"""Backbones: every registered one returns res2..res5 NCHW at strides 4-32 with its declared channels;
local checkpoints load (timm, torchvision and original-Swin naming) or fail naming the keys."""

from __future__ import annotations

import pytest
import torch
from helpers.small_models import SMALL_SWIN
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformerBlock

from proscale.models.backbones import BACKBONES, _PadFirstSwinBlock, build_backbone

# kwargs per registered backbone (a small timm model for the generic entry; a non-default drop-path)
BACKBONE_KWARGS = {"timm": {"model_name": "convnext_atto"}, "swin_t": {"drop_path_rate": 0.1}}


@pytest.fixture(scope="module", params=BACKBONES.names())
def named_backbone(request):
    return request.param, build_backbone(request.param, **BACKBONE_KWARGS.get(request.param, {})).eval()


@pytest.fixture
def backbone(named_backbone):
    return named_backbone[1]


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (32, 32)])
def test_shapes_strides_and_channels(backbone, size):
    height, width = size
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, height, width))
    assert list(features) == ["res2", "res3", "res4", "res5"]
    assert backbone.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    for name, feature in features.items():
        stride = backbone.strides[name]
        assert feature.shape == (2, backbone.out_channels[name], height // stride, width // stride)
        assert feature.is_contiguous()
        assert torch.isfinite(feature).all()


def test_declared_channels_of_the_named_backbones(named_backbone):
    name, backbone = named_backbone
    if name == "r50":
        assert backbone.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
        assert backbone.output_norms is None
    elif name == "swin_t":
        assert backbone.out_channels == {"res2": 96, "res3": 192, "res4": 384, "res5": 768}
        assert len(backbone.output_norms) == 4
        stages = [backbone.body.get_submodule(f"layers_{i}") for i in range(4)]
        assert [len(s.blocks) for s in stages] == [2, 2, 6, 2]
        assert [s.blocks[0].attn.num_heads for s in stages] == [3, 6, 12, 24]
        blocks = [m for m in backbone.body.modules() if isinstance(m, SwinTransformerBlock)]
        assert all(type(b) is _PadFirstSwinBlock and b.window_size == (7, 7) for b in blocks)
        drop_probs = [b.drop_path2.drop_prob for b in blocks if hasattr(b.drop_path2, "drop_prob")]
        assert max(drop_probs) == pytest.approx(0.1)  # drop_path_rate reaches the last block
    else:
        assert backbone.out_channels == {"res2": 40, "res3": 80, "res4": 160, "res5": 320}


def test_swin_pads_before_the_cyclic_shift():
    """On maps that are whole windows both orders agree; otherwise timm's shift-then-pad differs from the
    original's pad-then-shift, which is what detectron2 / HF Swin checkpoints were trained with."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(
        32, (14, 14), num_heads=2, window_size=7, shift_size=3, always_partition=True, dynamic_mask=True
    ).eval()
    timm_attn = block._attn
    block.__class__ = _PadFirstSwinBlock
    whole, ragged = torch.randn(1, 14, 14, 32), torch.randn(1, 9, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(block._attn(whole), timm_attn(whole), atol=1e-5, rtol=0)
        assert (block._attn(ragged) - timm_attn(ragged)).abs().max() > 1e-2


def test_loads_timm_and_torchvision_checkpoints(tmp_path):
    import timm
    import torchvision

    reference = timm.create_model("resnet18", pretrained=False)
    save_file(reference.state_dict(), tmp_path / "timm.safetensors")
    loaded = build_backbone("timm", model_name="resnet18", pretrained=str(tmp_path / "timm.safetensors"))
    torch.testing.assert_close(loaded.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    tv = torchvision.models.resnet18(weights=None)
    torch.save({"model": tv.state_dict()}, tmp_path / "tv.pth")
    loaded = build_backbone("timm", model_name="resnet18", pretrained=str(tmp_path / "tv.pth"))
    torch.testing.assert_close(loaded.body.conv1.weight, tv.conv1.weight)
    torch.testing.assert_close(loaded.body.layer2[0].downsample[1].running_var, tv.layer2[0].downsample[1].running_var)


def test_loads_original_swin_checkpoint(tmp_path):
    """Original Swin checkpoints merge patches at the end of a stage; timm's filter moves them."""
    import re

    import timm

    kwargs = {k: v for k, v in SMALL_SWIN.items() if k != "model_name"}
    reference = timm.create_model(SMALL_SWIN["model_name"], pretrained=False, **kwargs)
    original = {}
    for key, value in reference.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        original[key.replace("head.fc.", "head.")] = value
    torch.save({"model": original}, tmp_path / "swin_original.pth")
    loaded = build_backbone("timm", output_norms=True, pretrained=str(tmp_path / "swin_original.pth"), **SMALL_SWIN)
    torch.testing.assert_close(
        loaded.body.layers_2.downsample.reduction.weight, reference.layers[2].downsample.reduction.weight
    )
    torch.testing.assert_close(
        loaded.body.layers_2.blocks[1].attn.relative_position_bias_table,
        reference.layers[2].blocks[1].attn.relative_position_bias_table,
    )


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    import timm

    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state.pop("layer3.0.conv1.weight")
    state["layer9.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layer3\.0\.conv1\.weight") as err:
        build_backbone("timm", model_name="resnet18", pretrained=str(path))
    assert "layer9.extra.weight" in str(err.value) and "bad.pth" in str(err.value)


def test_bad_backbone_choices():
    with pytest.raises(ValueError, match="valid choices"):
        build_backbone("resnet9000")
    with pytest.raises(ValueError, match="strides"):
        build_backbone("timm", model_name="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="does not exist"):
        build_backbone("r50", pretrained="/nonexistent/weights.pth")


def test_freeze_bn_keeps_statistics_fixed_in_training():
    backbone = build_backbone("timm", model_name="resnet18", freeze_bn=True).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
