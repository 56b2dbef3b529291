"""Every registered encoder behind the same interface: shapes, gradients, NaN, bf16, batching, errors.

Encoder-level tests run on random projected feature maps (coarse first, like the pixel decoder feeds
them), tiny d_model. Whole-model tests over encoder x backbone x LPE live at the bottom of this file.
"""

from __future__ import annotations

import pytest
import torch

from proscale.models.encoders import ENCODERS, MultiScaleEncoder

D_MODEL = 32
SMALL = {"d_model": D_MODEL, "n_heads": 4, "dim_feedforward": 64}
ENCODER_NAMES = ENCODERS.names()
# bf16 keeps 8 mantissa bits (relative precision 2**-8 ~ 0.4 %); over 6-9 layers or ~20 convs the
# relative L2 error of the outputs measured 0.3-0.7 % (deformable encoders) and 1-2 % (RT-M2F).
BF16_REL_TOL = 0.05


def build(name: str, **overrides) -> MultiScaleEncoder:
    return ENCODERS.build(name, **{**SMALL, **overrides})


def feature_maps(batch: int, coarse: tuple[int, int], channels: int = D_MODEL, exact: bool = True):
    """Random (B, C, H, W) maps at 1/32, 1/16, 1/8. ``exact``: sizes of an input padded to 32;
    otherwise the ceil-divided sizes of an unpadded image (e.g. 100 x 70 px)."""
    h, w = coarse
    if exact:
        sizes = [(h, w), (2 * h, 2 * w), (4 * h, 4 * w)]
    else:
        sizes = [(-(-100 // s), -(-70 // s)) for s in (32, 16, 8)]
    return [torch.randn(batch, channels, sh, sw) for sh, sw in sizes]


def test_registry_has_every_encoder():
    assert set(ENCODER_NAMES) >= {"m2f", "proscale", "rt_m2f", "lite_m2f"}


def test_unknown_encoder_lists_valid_choices():
    with pytest.raises(ValueError, match=r"unknown encoder 'nope'.*lite_m2f.*m2f.*proscale.*rt_m2f"):
        ENCODERS.build("nope")


@pytest.mark.parametrize("exact", [True, False], ids=["padded", "odd_sizes"])
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_shapes_and_finite(name, exact):
    encoder = build(name)
    feats = feature_maps(2, (2, 3), exact=exact)
    out = encoder(feats)
    assert isinstance(out, list) and len(out) == 3
    for o, f in zip(out, feats):
        assert o.shape == f.shape
        assert torch.isfinite(o).all()
    # the encoder must actually change every level (not pass a map through untouched)
    for o, f in zip(out, feats):
        assert not torch.allclose(o, f)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_every_parameter_gets_a_gradient(name):
    encoder = build(name)
    # Deformable-DETR zero-initialises the offset / attention-weight projections, which makes some
    # gradients (e.g. of the level embedding) exactly zero at init; perturb so every path is live.
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.01 * torch.randn_like(param))
    feats = [f.requires_grad_() for f in feature_maps(2, (2, 3))]
    out = encoder(feats)
    # a weighted sum so no gradient cancels by symmetry (e.g. after a norm layer)
    loss = sum((o * torch.randn_like(o)).sum() for o in out)
    loss.backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: no/NaN gradient for {missing}"
    zero = [n for n, p in encoder.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"{name}: zero gradient for {zero}"
    assert all(torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in feats)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_bf16_autocast_close_to_fp32(name):
    encoder = build(name).eval()
    feats = feature_maps(2, (3, 4))
    with torch.no_grad():
        reference = encoder(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = encoder(feats)
    for r, o in zip(reference, low):
        assert o.shape == r.shape and torch.isfinite(o.float()).all()
        rel = ((o.float() - r).norm() / r.norm()).item()
        assert rel < BF16_REL_TOL, f"{name}: bf16 relative L2 error {rel:.4f}"


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_batch_items_are_independent(name):
    encoder = build(name).eval()
    feats = feature_maps(2, (2, 3))
    with torch.no_grad():
        together = encoder(feats)
        alone = encoder([f[1:] for f in feats])
    for t, a in zip(together, alone):
        torch.testing.assert_close(t[1:], a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_wrong_number_of_levels_is_a_clear_error(name):
    encoder = build(name)
    with pytest.raises(ValueError, match="expects 3 feature maps, got 2"):
        encoder(feature_maps(1, (2, 2))[:2])


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_default_width_builds(name):
    """Paper hyperparameters (d 256) construct and run on a tiny map."""
    encoder = ENCODERS.build(name)
    out = encoder(feature_maps(1, (1, 2), channels=256))
    assert [o.shape[1] for o in out] == [256, 256, 256]


def test_lite_m2f_default_interleaving():
    encoder = build("lite_m2f")
    assert len(encoder.layers) == 6
    assert "".join("A" if full else "H" for full in encoder.updates_all) == "HHAHHA"


def test_lite_m2f_high_level_updates_leave_low_level_tokens():
    """An encoder of high-level updates only must return the 1/8 map unchanged, the others refined."""
    encoder = build("lite_m2f", num_blocks=1, high_level_updates=2)
    encoder.updates_all = [False] * len(encoder.layers)
    feats = feature_maps(1, (2, 3))
    out = encoder(feats)
    torch.testing.assert_close(out[2], feats[2])
    assert not torch.allclose(out[0], feats[0]) and not torch.allclose(out[1], feats[1])


def test_lite_m2f_high_level_queries_attend_all_scales():
    """High-level tokens read the 1/8 tokens as values: changing only 1/8 changes the 1/32 output."""
    encoder = build("lite_m2f", num_blocks=1, high_level_updates=1)
    encoder.updates_all = [False] * len(encoder.layers)
    feats = feature_maps(1, (2, 3))
    base = encoder(feats)[0]
    feats[2] = feats[2] + torch.randn_like(feats[2])
    assert not torch.allclose(encoder(feats)[0], base)


def test_lite_m2f_query_counts_with_hooks():
    encoder = build("lite_m2f")
    feats = feature_maps(1, (2, 3))
    n5, n4, n3 = (f.shape[-1] * f.shape[-2] for f in feats)
    seen = []
    for layer in encoder.layers:
        layer.self_attn.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[1], args[2].shape[1])))
    encoder(feats)
    full, high = (n5 + n4 + n3, n5 + n4 + n3), (n5 + n4, n5 + n4 + n3)
    assert seen == [high, high, full, high, high, full]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_blocks": 0}, "num_blocks must be >= 1"),
        ({"high_level_updates": -1}, "high_level_updates must be >= 0"),
        ({"num_high_levels": 3}, "num_high_levels must be in"),
    ],
)
def test_lite_m2f_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("lite_m2f", **kwargs)


def test_rt_m2f_aifi_only_on_coarsest_and_ccfm_structure():
    encoder = build("rt_m2f")
    assert len(encoder.aifi) == 1 and isinstance(encoder.aifi[0].activation, torch.nn.GELU)
    assert encoder.aifi[0].self_attn.num_heads == 4 and encoder.aifi[0].linear1.out_features == 64
    feats = feature_maps(1, (2, 3))
    n5 = feats[0].shape[-1] * feats[0].shape[-2]
    seen = []
    encoder.aifi[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    encoder(feats)
    assert seen == [torch.Size([1, n5, D_MODEL])]
    assert len(encoder.fpn_blocks) == len(encoder.pan_blocks) == 2
    assert len(encoder.fpn_blocks[0].blocks) == 3  # RT-DETR-R50 depth: 3 RepVGG blocks per CSPRep
    acts = {type(m) for m in encoder.pan_blocks.modules() if isinstance(m, torch.nn.SiLU | torch.nn.ReLU)}
    assert acts == {torch.nn.SiLU}


def test_rt_m2f_sincos_embedding_values():
    """Channel layout [sin(x w), cos(x w), sin(y w), cos(y w)] in row-major token order."""
    encoder = build("rt_m2f")
    pos = encoder.pos_embed(2, 3, torch.device("cpu"), torch.float32)  # (6, 32)
    quarter = D_MODEL // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter) / quarter)
    token = 1 * 3 + 2  # y = 1, x = 2
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), (1 * omega).sin(), (1 * omega).cos()])
    torch.testing.assert_close(pos[token], expected)


def test_rt_m2f_bad_config():
    with pytest.raises(ValueError, match="norm must be 'gn' or 'bn'"):
        build("rt_m2f", norm="ln")
    with pytest.raises(ValueError, match="divisible by 4"):
        ENCODERS.build("rt_m2f", d_model=30, n_heads=2)


def test_rt_m2f_batchnorm_option_runs():
    encoder = build("rt_m2f", norm="bn")
    out = encoder(feature_maps(2, (2, 3)))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    assert all(torch.isfinite(o).all() for o in out)


# ----------------------------------------------------------------------------- whole model: encoder x backbone x LPE

# bf16 in the whole model: the pixel decoder (with the encoder) runs in fp32 under autocast, so bf16 only
# reaches it through the backbone features (relative error ~0.5 %). Its outputs are compared with a 5 %
# relative-L2 tolerance. The final logits / masks are only checked for finiteness: the masked-attention
# decoder thresholds sigmoid(mask) at 0.5, so a bf16 rounding can flip attention-mask bits and move the
# outputs discontinuously (measured 0.6-15 % relative error with random weights, encoder-independent).
MODEL_BF16_REL_TOL = 0.05
TINY_BACKBONE = "regnetx_002"  # a 2.3 M-parameter timm network with res2..res5 at strides 4..32


@pytest.fixture(scope="module")
def backbones():
    from proscale.models.backbones import build_backbone

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_backbone("timm", model_name=TINY_BACKBONE) if name == "tiny" else build_backbone(name)
        return cache[name]

    return get


def check_model(backbone, encoder_name: str, lpe: bool) -> None:
    from proscale.models.mask2former import Mask2Former

    width = {"d_model": 32, "n_heads": 4, "dim_feedforward": 64}
    model = Mask2Former(
        backbone,
        ENCODERS.build(encoder_name, **width),
        num_classes=3,
        conv_dim=32,
        mask_dim=32,
        lpe=lpe,
        num_queries=5,
        dec_layers=3,
        hidden_dim=32,
        dim_feedforward=64,
        nheads=4,
    ).train()
    model.zero_grad(set_to_none=True)
    images = torch.randn(2, 3, 64, 64)
    out = model(images)
    assert out["pred_logits"].shape == (2, 5, 4) and out["pred_masks"].shape == (2, 5, 16, 16)
    assert len(out["aux_outputs"]) == 3
    loss = sum((out[k] * torch.randn_like(out[k])).sum() for k in ("pred_logits", "pred_masks"))
    loss = loss + sum((aux["pred_masks"] * torch.randn_like(aux["pred_masks"])).sum() for aux in out["aux_outputs"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{encoder_name} lpe={lpe}: no/NaN gradient for {missing[:10]}"
    model.eval()
    pixel_outputs = []
    model.pixel_decoder.register_forward_hook(lambda m, args, out: pixel_outputs.append(out))
    with torch.no_grad():
        reference = model(images[:1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images[:1])
    for key in ("pred_logits", "pred_masks"):
        assert torch.isfinite(reference[key]).all() and torch.isfinite(low[key].float()).all()
    fp32, bf16 = pixel_outputs
    for r, o in zip([fp32.mask_features, *fp32.multi_scale_features], [bf16.mask_features, *bf16.multi_scale_features]):
        rel = ((o.float() - r).norm() / r.norm()).item()
        assert rel < MODEL_BF16_REL_TOL, f"{encoder_name} lpe={lpe}: bf16 pixel-decoder relative L2 error {rel:.4f}"


@pytest.mark.parametrize("lpe", [False, True], ids=["conv", "lpe"])
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_model_with_every_encoder_and_lpe(backbones, name, lpe):
    """Tiny backbone: shapes, every model parameter gets a gradient, finite, bf16 close to fp32."""
    check_model(backbones("tiny"), name, lpe)


@pytest.mark.parametrize("backbone", ["r50", "swin_t"])
def test_model_with_the_paper_backbones(backbones, backbone):
    """The paper's backbones with PRO-SCALE + LPE: the default suite's cheap version of the full matrix below."""
    check_model(backbones(backbone), "proscale", True)


@pytest.mark.slow
@pytest.mark.parametrize("lpe", [False, True], ids=["conv", "lpe"])
@pytest.mark.parametrize("name", ENCODER_NAMES)
@pytest.mark.parametrize("backbone", ["r50", "swin_t"])
def test_model_every_encoder_backbone_lpe(backbones, backbone, name, lpe):
    check_model(backbones(backbone), name, lpe)


# ----------------------------------------------------------------------------- Hydra: model/encoder=<name>

TINY_MODEL = [
    "model.num_classes=133",  # the config's null means "the dataset's"; no dataset here
    "model/backbone=timm",
    f"model.backbone.model_name={TINY_BACKBONE}",
    "model.conv_dim=64",
    "model.mask_dim=64",
    "model.hidden_dim=64",
    "model.num_queries=5",
    "model.dec_layers=3",
]


def compose_model(overrides: list[str]):
    import os

    from hydra import compose, initialize_config_dir

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_hydra_encoder_choice_builds_the_registered_class(name):
    from hydra.utils import instantiate

    cfg = compose_model([f"model/encoder={name}", *TINY_MODEL])
    model = instantiate(cfg.model)
    assert type(model.pixel_decoder.encoder) is ENCODERS.get(name)
    assert model.pixel_decoder.encoder.d_model == 64


def test_hydra_unknown_encoder_lists_valid_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_model(["model/encoder=nope"])
    for name in ENCODERS.names():
        assert f"\t{name}\n" in str(info.value) + "\n"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.encoder.schedule=[1,-1,1]", "negative entry"),
        ("model.encoder.schedule=[3,3,0]", "last stage needs >= 1 layer"),
        ("model.encoder.schedule=[3,3]", "needs one per level"),
    ],
)
def test_hydra_bad_schedule_is_a_clear_error(override, message):
    from hydra.utils import instantiate

    cfg = compose_model(["model/encoder=proscale", override, *TINY_MODEL])
    with pytest.raises(Exception, match=message):
        instantiate(cfg.model.encoder)


def test_rt_m2f_group_norm_groups():
    """GroupNorm(32) at d_model 256 like M2F; >= 8 channels per group at smaller widths."""
    from proscale.models.encoders.rt_m2f import make_norm

    assert [make_norm("gn", c).num_groups for c in (256, 128, 96, 64, 32)] == [32, 16, 12, 8, 4]
    assert isinstance(make_norm("bn", 64), torch.nn.BatchNorm2d)
