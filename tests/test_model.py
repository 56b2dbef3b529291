"""Mask2Former end to end, parametrized over the registered backbones: output format, gradients, finiteness,
batch independence, LPE, bad input, and the Hydra interface."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from proscale.models import BACKBONES, Mask2Former, build_backbone
from proscale.models.encoders import M2FEncoder
from proscale.models.pixel_decoder import LightPixelEmbedding

BACKBONE_KWARGS = {"timm": {"model_name": "convnext_atto"}, "swin_t": {"drop_path_rate": 0.0}}
QUERIES, CLASSES, DIM = 6, 4, 64
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def tiny_model(backbone_name: str, lpe: bool = False) -> Mask2Former:
    torch.manual_seed(0)
    return Mask2Former(
        build_backbone(backbone_name, **BACKBONE_KWARGS.get(backbone_name, {})),
        M2FEncoder(d_model=DIM, num_layers=2, n_heads=4, dim_feedforward=128),
        num_classes=CLASSES,
        conv_dim=DIM,
        mask_dim=DIM,
        lpe=lpe,
        num_queries=QUERIES,
        hidden_dim=DIM,
        dim_feedforward=128,
        nheads=4,
    )


@pytest.fixture(scope="module", params=BACKBONES.names())
def model(request):
    return tiny_model(request.param)


def all_predictions(out: dict) -> list[dict]:
    return [*out["aux_outputs"], {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]


def test_output_format(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, QUERIES, CLASSES + 1)
    assert out["pred_masks"].shape == (2, QUERIES, 16, 24)
    assert len(out["aux_outputs"]) == 9  # 10 predictions: before layer 1 and after each of the 9 layers
    for prediction in all_predictions(out):
        assert prediction["pred_logits"].shape == (2, QUERIES, CLASSES + 1)
        assert prediction["pred_masks"].shape == (2, QUERIES, 16, 24)
        assert torch.isfinite(prediction["pred_logits"]).all() and torch.isfinite(prediction["pred_masks"]).all()
    # the layers change the queries: consecutive predictions differ
    assert not torch.equal(out["aux_outputs"][0]["pred_logits"], out["aux_outputs"][1]["pred_logits"])


def test_every_parameter_gets_a_finite_gradient(model):
    """Zero-initialised parameters (deformable offsets / attention weights, timm's last-BN gammas) make
    some gradients exactly zero at init; after a small perturbation every parameter must get a non-zero,
    finite gradient, i.e. be connected to the outputs."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model(torch.randn(2, 3, 32, 64))
    loss = sum(p["pred_logits"].pow(2).mean() + p["pred_masks"].pow(2).mean() for p in all_predictions(out))
    loss.backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    not_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not not_finite
    zero = [n for n, p in params.items() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_images_in_a_padded_batch_are_predicted_independently(model):
    """What equality is achievable: Mask2Former, like the original, never masks padding (zero-padded convs,
    positional embeddings and deformable reference points normalized over the padded extent, cross-attention
    over padded positions), so an image's prediction depends on how much padding it gets. Exact (up to float
    summation order) is: an image padded to the batch size predicts the same inside a batch as alone with
    the same padding; an image whose own padded size is the batch size (``large`` here) is therefore
    identical to running it alone padded to its own multiple of 32. ``small`` padded only to its own
    multiple of 32 is a different input, and its predictions do differ (checked below)."""
    model.eval()
    torch.manual_seed(1)
    large = torch.randn(1, 3, 64, 96)
    small = F.pad(torch.randn(1, 3, 40, 50), (0, 96 - 50, 0, 64 - 40))  # valid 40x50, batch pad 64x96
    with torch.no_grad():
        batched = model(torch.cat([small, large]))
        alone = [model(small), model(large)]
        small_own_pad = model(small[:, :, :64, :64])  # 40x50 padded to its own multiple of 32
    for index, single in enumerate(alone):
        for in_batch, by_itself in zip(all_predictions(batched), all_predictions(single)):
            torch.testing.assert_close(
                in_batch["pred_logits"][index : index + 1], by_itself["pred_logits"], atol=1e-4, rtol=0
            )
            torch.testing.assert_close(
                in_batch["pred_masks"][index : index + 1], by_itself["pred_masks"], atol=1e-4, rtol=0
            )
    valid = batched["pred_masks"][0, :, : 64 // 4, : 64 // 4]
    assert (valid - small_own_pad["pred_masks"][0]).abs().max() > 1e-3


def test_lpe_replaces_the_stride4_conv_by_a_max_pool():
    model = tiny_model("timm", lpe=True).eval()
    layer_1 = model.pixel_decoder.layer_1
    assert isinstance(layer_1[0], nn.MaxPool2d) and isinstance(layer_1[1], nn.GroupNorm)
    assert sorted(k for k in model.state_dict() if ".layer_1." in k) == [
        "pixel_decoder.layer_1.1.bias",
        "pixel_decoder.layer_1.1.weight",
    ]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["pred_masks"].shape == (1, QUERIES, 16, 16) and torch.isfinite(out["pred_masks"]).all()


@pytest.mark.parametrize("lpe", [False, True])
def test_pixel_decoder_parts_compose_to_the_whole(lpe):
    """project_inputs -> encoder -> stride4_features (what the benchmark times separately) is the forward, on the
    inference fast path and on the module path alike."""
    decoder = tiny_model("timm", lpe=lpe).eval().pixel_decoder
    gen = torch.Generator().manual_seed(0)
    channels = {"res2": decoder.adapter_1[0].in_channels}  # input_proj is res5, res4, res3
    channels.update({k: proj[0].in_channels for k, proj in zip(("res5", "res4", "res3"), decoder.input_proj)})
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    feats = {k: torch.randn(1, c, 64 // strides[k], 64 // strides[k], generator=gen) for k, c in channels.items()}
    with torch.no_grad():
        whole = decoder(feats).mask_features
        for fast in (True, False):
            encoded = decoder.encoder(decoder.project_inputs(feats, fast))
            parts = decoder.stride4_features(feats["res2"], encoded[-1], fast)
            torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
        assert decoder._fast_path_applies(feats["res2"])  # (so the fast branch above is the one forward takes)


def test_lpe_pool_equals_max_pool2d_in_values_and_gradients():
    # the CPU channels-last detour must not change anything: ties included (max_pool2d sends the gradient
    # of a tied window to one element), output contiguous like max_pool2d's
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 11)
    x[0, 0, :4, :4] = 1.0
    x[1, 3] = 0.0
    grad = torch.randn(2, 8, 9, 11)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = LightPixelEmbedding()(ours_in), F.max_pool2d(ref_in, 3, 1, 1)
    ours.backward(grad)
    ref.backward(grad)
    assert ours.is_contiguous() and torch.equal(ours, ref) and torch.equal(ours_in.grad, ref_in.grad)


def test_original_initialisation():
    model = tiny_model("timm")
    decoder = model.pixel_decoder
    for proj in decoder.input_proj:
        assert torch.count_nonzero(proj[0].bias) == 0
    bound = (6 / ((1 + 1) * DIM * 9)) ** 0.5  # kaiming_uniform(a=1) on the 3x3 conv: fan_in = 64*9
    assert decoder.layer_1[0].weight.abs().max() <= bound and decoder.layer_1[0].weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(decoder.mask_features.bias) == 0
    layer = model.transformer_decoder.transformer_cross_attention_layers[0].multihead_attn
    assert torch.count_nonzero(layer.in_proj_bias) == 0
    assert isinstance(model.transformer_decoder.input_proj[0], nn.Identity)  # conv_dim == hidden_dim


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 64, 64), "4-D"),
        ((1, 1, 64, 64), "3 channels"),
        ((1, 4, 64, 64), "3 channels"),
        ((1, 3, 16, 64), "at least 32"),
        ((1, 3, 64, 80), "pad to a multiple of 32"),
    ],
)
def test_bad_images_raise(shape, message):
    model = tiny_model("timm")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_num_classes_must_be_positive():
    with pytest.raises(ValueError, match="num_classes"):
        Mask2Former(
            build_backbone("timm", model_name="convnext_atto"), M2FEncoder(d_model=64), num_classes=0, conv_dim=64
        )


def test_encoder_width_must_match_conv_dim():
    with pytest.raises(ValueError, match="d_model"):
        Mask2Former(
            build_backbone("timm", model_name="convnext_atto"), M2FEncoder(d_model=128), num_classes=3, conv_dim=64
        )


@pytest.mark.parametrize("backbone_name, res5_channels", [("r50", 2048), ("swin_t", 768)])
def test_hydra_instantiates_the_model(backbone_name, res5_channels):
    import hydra
    from hydra import compose, initialize_config_dir

    overrides = [
        f"model/backbone={backbone_name}",
        "model.num_classes=7",
        "model.num_queries=5",
        "model.conv_dim=64",
        "model.mask_dim=64",
        "model.hidden_dim=64",
        "model.encoder.num_layers=1",
        "model.dim_feedforward=64",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, Mask2Former) and isinstance(model, nn.Module)
    assert model.backbone.out_channels["res5"] == res5_channels
    assert model.pixel_decoder.encoder.d_model == 64  # the encoder follows model.conv_dim
    assert len(model.pixel_decoder.encoder.layers) == 1
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 5, 8) and out["pred_masks"].shape == (1, 5, 16, 16)
    assert len(out["aux_outputs"]) == 9


def test_hydra_defaults_are_mask2formers():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train")
    m = cfg.model
    assert m._target_ == "proscale.models.Mask2Former" and m.backbone.name == "r50" and m.lpe is False
    assert (m.num_queries, m.dec_layers, m.hidden_dim, m.dim_feedforward, m.nheads) == (100, 9, 256, 2048, 8)
    assert (m.encoder.num_layers, m.encoder.d_model, m.encoder.dim_feedforward) == (6, 256, 1024)
