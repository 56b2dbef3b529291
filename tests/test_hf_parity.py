"""Parity with Hugging Face transformers' independent Mask2Former port (random weights, offline).

HF's model is built from configs with a real ResNet-50 / Swin-T backbone and a narrower head (feature /
hidden / mask dims 64, 10 queries, FFN 128: the same architecture, only smaller, to keep the test at a
few seconds). Its state dict goes through ``hf_to_proscale`` and must load into ours with no missing and
no unused keys. Both run on the same normalized image of a non-square size that is not a multiple of 32,
zero-padded to one, and must agree within 1e-4 (abs, fp32, CPU) on the pixel decoder's mask features and
three multi-scale maps and on every one of the 10 predictions' class and mask logits.

HF keys intentionally absent from ours (dropped by the converter, see ``proscale/convert/hf.py``):
``criterion.empty_weight`` and, for Swin, the final ``swin.layernorm``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from proscale.convert import hf_to_proscale, load_into
from proscale.models import Mask2Former, build_backbone
from proscale.models.encoders import M2FEncoder
from proscale.structures import PIXEL_MEAN, PIXEL_STD

DIM, QUERIES, FFN, CLASSES, HEADS = 64, 10, 128, 7, 8
TOL = 1e-4


def hf_model(backbone: str):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "r50":
        backbone_config = ResNetConfig(
            depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", out_features=stages
        )
    else:
        backbone_config = SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=stages
        )
    config = Mask2FormerConfig(
        backbone_config=backbone_config,
        feature_size=DIM,
        mask_feature_size=DIM,
        hidden_dim=DIM,
        encoder_feedforward_dim=FFN,
        dim_feedforward=FFN,
        num_queries=QUERIES,
        num_attention_heads=HEADS,
        num_labels=CLASSES,
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    # HF's init leaves deformable offsets / attention weights at zero and norms at identity, which would
    # hide mapping errors (e.g. positional embeddings then have no effect): perturb everything except the
    # backbone's convolutions / linears (perturbing those makes ResNet activations explode).
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            in_backbone = name.startswith("model.pixel_level_module.encoder.")
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif not in_backbone or any(s in name for s in ("norm", "relative_position_bias_table", "running_mean")):
                tensor.add_(0.05 * torch.randn_like(tensor))
    return model


def our_model(backbone: str) -> Mask2Former:
    encoder = M2FEncoder(d_model=DIM, n_heads=HEADS, dim_feedforward=FFN)
    model = Mask2Former(
        build_backbone(backbone, **({"drop_path_rate": 0.0} if backbone == "swin_t" else {})),
        encoder,
        num_classes=CLASSES,
        conv_dim=DIM,
        mask_dim=DIM,
        num_queries=QUERIES,
        hidden_dim=DIM,
        dim_feedforward=FFN,
        nheads=HEADS,
    )
    return model.eval()


def padded_image(height: int = 83, width: int = 117) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, height, width, generator=generator) * 255
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    image = (image - mean) / std
    return F.pad(image, (0, (-width) % 32, 0, (-height) % 32))  # 83x117 -> 96x128


@pytest.mark.parametrize("backbone", ["r50", "swin_t"])
def test_matches_hugging_face(backbone: str) -> None:
    hf = hf_model(backbone)
    ours = our_model(backbone)
    converted = hf_to_proscale(hf.state_dict())
    report = load_into(ours, converted)  # raises on any missing / unused / mis-shaped key
    assert report.ok

    images = padded_image()
    assert images.shape[-2:] == (96, 128)
    with torch.no_grad():
        hf_out = hf(images, output_hidden_states=True, output_auxiliary_logits=True)
        features = ours.backbone(images)
        pixels = ours.pixel_decoder(features)
        out = ours.transformer_decoder(pixels.multi_scale_features, pixels.mask_features)

    hf_backbone = hf_out.encoder_hidden_states
    for name, hf_feature in zip(("res2", "res3", "res4", "res5"), hf_backbone):
        torch.testing.assert_close(features[name], hf_feature, atol=TOL, rtol=0)
    torch.testing.assert_close(pixels.mask_features, hf_out.pixel_decoder_last_hidden_state, atol=TOL, rtol=0)
    assert len(hf_out.pixel_decoder_hidden_states) == 3
    for ours_map, hf_map in zip(pixels.multi_scale_features, hf_out.pixel_decoder_hidden_states):
        torch.testing.assert_close(ours_map, hf_map, atol=TOL, rtol=0)

    predictions = [*out["aux_outputs"], out]
    hf_predictions = [
        *hf_out.auxiliary_logits,
        {"class_queries_logits": hf_out.class_queries_logits, "masks_queries_logits": hf_out.masks_queries_logits},
    ]
    assert len(predictions) == len(hf_predictions) == 10
    for ours_pred, hf_pred in zip(predictions, hf_predictions):
        torch.testing.assert_close(ours_pred["pred_logits"], hf_pred["class_queries_logits"], atol=TOL, rtol=0)
        torch.testing.assert_close(ours_pred["pred_masks"], hf_pred["masks_queries_logits"], atol=TOL, rtol=0)
