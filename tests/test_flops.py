"""Compute analysis: hand-checked operator counts, fvcore cross-check, post-processing formula, paper numbers."""

from __future__ import annotations

import csv
import warnings
from math import prod

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from proscale.analysis.flop_counter import count_call_flops, deformable_attention_as_grid_sample
from proscale.analysis.flops import (
    PART_KEYS,
    count_flops,
    count_flops_average,
    count_params,
    postprocess_flops,
    resize_for_test,
)

# ---------------------------------------------------------------------------------------------------------------
# Operators and modules, counted by hand


class Call(nn.Module):
    """Wraps a function of tensors so that it can be counted."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _t(*shape):
    return torch.randn(*shape)


OPERATOR_CASES = {
    # name: (function, inputs, expected flops with fvcore's conventions)
    "linear": (lambda x, w, b: F.linear(x, w, b), (_t(2, 7, 5), _t(3, 5), _t(3)), 2 * 7 * 5 * 3),
    "matmul_broadcast": (torch.matmul, (_t(2, 7, 5), _t(5, 3)), 2 * 7 * 5 * 3),
    "bmm": (torch.bmm, (_t(3, 4, 5), _t(3, 5, 6)), 3 * 4 * 5 * 6),
    "baddbmm": (torch.baddbmm, (_t(3, 4, 6), _t(3, 4, 5), _t(3, 5, 6)), 3 * 4 * 5 * 6),
    "einsum": (lambda a, b: torch.einsum("bqc,bchw->bqhw", a, b), (_t(2, 5, 8), _t(2, 8, 4, 6)), 2 * 5 * 8 * 24),
    "conv_stride2": (lambda x, w: F.conv2d(x, w, stride=2, padding=1), (_t(2, 3, 16, 20), _t(8, 3, 3, 3)),
                     2 * (8 * 3 * 3 * 3) * (8 * 10)),
    "grid_sample": (lambda x, g: F.grid_sample(x, g, align_corners=False), (_t(2, 8, 10, 12), _t(2, 5, 7, 2)),
                    4 * 2 * 8 * 5 * 7),
    "group_norm_affine": (lambda x, w, b: F.group_norm(x, 2, w, b), (_t(2, 8, 4, 5), _t(8), _t(8)), 5 * 2 * 8 * 20),
    "layer_norm_affine": (lambda x, w, b: F.layer_norm(x, (16,), w, b), (_t(4, 10, 16), _t(16), _t(16)), 5 * 640),
    "layer_norm_plain": (lambda x: F.layer_norm(x, (16,)), (_t(4, 10, 16),), 4 * 640),
    "batch_norm_eval": (lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, training=False),
                        (_t(2, 8, 4, 4), _t(8), _t(8).abs(), _t(8), _t(8)), 2 * 256),
    "bilinear_upsample": (lambda x: F.interpolate(x, size=(6, 8), mode="bilinear", align_corners=False),
                          (_t(1, 2, 3, 4),), 4 * 2 * 6 * 8),
    "nearest_upsample": (lambda x: F.interpolate(x, size=(6, 8), mode="nearest"), (_t(1, 2, 3, 4),), 2 * 6 * 8),
    "adaptive_avg_pool": (lambda x: F.adaptive_avg_pool2d(x, 3), (_t(1, 2, 6, 8),), 2 * 6 * 8),
    "sdpa": (F.scaled_dot_product_attention, (_t(2, 4, 10, 8), _t(2, 4, 12, 8), _t(2, 4, 12, 6)),
             2 * 4 * 10 * 12 * (8 + 6)),
    "not_counted": (lambda x: F.max_pool2d(x.softmax(-1).relu() * 2 + x, 3, 1, 1).sum(), (_t(1, 2, 6, 8),), 0),
}  # fmt: skip


@pytest.mark.parametrize("device", ["meta", "real"])
@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_operator_counts_by_hand(case, device):
    fn, inputs, expected = OPERATOR_CASES[case]
    assert count_call_flops(Call(fn), inputs, device=device).total == expected


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        y = self.norm(self.conv(x))
        up = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        tokens = F.max_pool2d(up, 2).flatten(2).transpose(1, 2)
        return self.head(tokens).softmax(-1)


def test_module_attribution_by_hand():
    model = TinyNet()
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    counted = count_call_flops(model, (torch.randn(1, 3, 16, 20),))
    conv = 8 * 3 * 3 * 3 * 16 * 20
    norm = 5 * 8 * 16 * 20
    upsample = 4 * 8 * 32 * 40
    head = 320 * 8 * 16 + 320 * 16 * 4
    assert counted.by_module["conv"] == conv
    assert counted.by_module["norm"] == norm
    assert counted.by_module["head"] == head
    assert counted.by_module["head.2"] == 320 * 16 * 4
    assert counted.total == conv + norm + upsample + head
    assert counted.output.shape == (1, 320, 4) and counted.output.is_meta
    # the real model is untouched: weights, device and training flags
    assert model.training and model.head.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("device", ["meta", "real"])
@pytest.mark.parametrize("impl", [None, "gather", "grid_sample"])
def test_deformable_sampling_counted_as_grid_sample_whatever_the_kernel(impl, device):
    from proscale.models.ops.ms_deform_attn import MSDeformAttn, get_default_impl

    default = get_default_impl()
    attention = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, impl=impl)
    shapes = [(4, 5), (2, 3)]
    tokens, queries = 20 + 6, 7
    inputs = (torch.randn(1, queries, 32), torch.rand(1, queries, 2, 2), torch.randn(1, tokens, 32), shapes)
    linears = tokens * 32 * 32 + queries * 32 * (4 * 2 * 2 * 2) + queries * 32 * (4 * 2 * 2) + queries * 32 * 32
    sampling = 4 * (4 * 8) * queries * 2 * 2  # 4 per sampled element: (B*M) x D x Q x (L*P)
    assert count_call_flops(attention, inputs, device=device).total == linears + sampling
    assert attention.impl == impl and get_default_impl() == default


def test_data_dependent_forward_needs_real_device():
    model = Call(lambda x: x[x > 0].sum() + F.linear(x, torch.ones(3, 4)).sum())
    with pytest.raises(ValueError, match="device='real'"):
        count_call_flops(model, (torch.randn(2, 4),))
    assert count_call_flops(model, (torch.randn(2, 4),), device="real").total == 2 * 4 * 3
    with pytest.raises(ValueError, match="device"):
        count_call_flops(model, (torch.randn(2, 4),), device="gpu")


# ---------------------------------------------------------------------------------------------------------------
# Test-time sizes and post-processing


@pytest.mark.parametrize(
    "orig, resized, padded",
    [
        ((480, 640), (800, 1067), (800, 1088)),
        ((640, 480), (1067, 800), (1088, 800)),
        ((427, 640), (800, 1199), (800, 1216)),
        ((500, 2000), (333, 1333), (352, 1344)),  # long side capped at 1333
        ((800, 800), (800, 800), (800, 800)),
    ],
)
def test_coco_resize_for_test(orig, resized, padded):
    assert resize_for_test(orig) == (resized, padded)


def test_resize_for_test_rejects_empty_image():
    with pytest.raises(ValueError, match="orig_size"):
        resize_for_test((0, 640))


@pytest.mark.parametrize("tasks", [(True, True, True), (False, False, True), (True, False, False)])
def test_postprocess_formula_equals_counting_the_inference_module(tasks):
    """The analytic formula matches the real inference run under the counter, data-dependent parts included."""
    from proscale.models.inference import Mask2FormerInference

    semantic, instance, panoptic = tasks
    num_queries, num_classes = 6, 5
    inference = Mask2FormerInference(
        num_classes, thing_classes=[0, 1, 2], semantic_on=semantic, instance_on=instance, panoptic_on=panoptic
    )
    logits = torch.randn(1, num_queries, num_classes + 1)
    logits[0, :3, :3] += 20 * torch.eye(3)  # three confident queries: the panoptic branch keeps and paints them
    masks = torch.full((1, num_queries, 16, 24), -10.0)
    for query in range(3):  # each confident query owns one vertical stripe
        masks[0, query, :, 8 * query : 8 * query + 8] = 10.0
    outputs = {"pred_logits": logits, "pred_masks": masks}
    counted = count_call_flops(inference, (outputs, [(60, 90)], [(45, 70)]), device="real")
    if panoptic:
        assert len(counted.output[0]["panoptic_seg"][1]) > 0  # the data-dependent path really ran
    expected = postprocess_flops(num_queries, num_classes, (64, 96), (45, 70), semantic, instance, panoptic)
    assert counted.total == expected
    resize = 4 * num_queries * (64 * 96 + 45 * 70)
    assert expected == resize + (num_queries * num_classes * 45 * 70 if semantic else 0)


def test_postprocess_coco_value():
    # 100 queries, 133 classes, 800x1088 padded, 480x640 original
    expected = 4 * 100 * 800 * 1088 + 4 * 100 * 480 * 640 + 100 * 133 * 480 * 640
    assert postprocess_flops(100, 133, (800, 1088), (480, 640)) == expected
    assert postprocess_flops(100, 133, (800, 1088), (480, 640), False, False, False) == 0


# ---------------------------------------------------------------------------------------------------------------
# The model, against fvcore


def build_mask2former(encoder: str, backbone: str = "r50", device: str = "cpu", **encoder_kwargs) -> nn.Module:
    from proscale.models.backbones import build_backbone
    from proscale.models.encoders import ENCODERS
    from proscale.models.mask2former import Mask2Former

    with torch.device(device):
        return Mask2Former(
            build_backbone(backbone), ENCODERS.build(encoder, **encoder_kwargs), 133, lpe=encoder == "proscale"
        )


MODELS = {"m2f": ("m2f", {}), "proscale": ("proscale", {"schedule": [1, 2, 3], "trc": True})}


def _sdpa_handle(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    return prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def fvcore_parts(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """fvcore's FlopCountAnalysis per part, GFLOPs. fvcore has no handle for the attention kernel that
    ``nn.MultiheadAttention(need_weights=False)`` and timm's Swin call, so one is added (its two matmuls);
    the deformable attention runs its reference grid_sample kernel, as the original Mask2Former on CPU."""
    with warnings.catch_warnings(), deformable_attention_as_grid_sample(model):
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model.eval(), images)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = analysis.by_module()
    return {
        "backbone": by_module["backbone"] / 1e9,
        "encoder": (by_module["pixel_decoder"] - by_module["pixel_decoder.mask_features"]) / 1e9,
        "encoder_layers": by_module["pixel_decoder.encoder"] / 1e9,
        "transformer_decoder": by_module["transformer_decoder"] / 1e9,
        "total": analysis.total() / 1e9,
    }


def _assert_agrees_with_fvcore(model, height, width):
    ours = count_flops(model, (height, width), (height, width), postprocess=False)
    theirs = fvcore_parts(model, torch.randn(1, 3, height, width))
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=0.01), key
        assert value > 0, key
    return ours


@pytest.mark.parametrize("name", list(MODELS))
def test_count_flops_agrees_with_fvcore_small(name):
    encoder, kwargs = MODELS[name]
    model = build_mask2former(encoder, **kwargs)
    ours = _assert_agrees_with_fvcore(model, 64, 96)
    assert ours["postprocess"] == 0 and ours["other"] == 0
    # counting on meta left no meta tensor behind (e.g. in positional-embedding caches): a real forward works
    count_flops(model, (64, 64), (50, 60))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert not out["pred_masks"].is_meta and torch.isfinite(out["pred_masks"]).all()
    assert ours["total"] == pytest.approx(
        ours["backbone"] + ours["encoder"] + ours["mask_projection"] + ours["transformer_decoder"]
    )


def test_count_flops_agrees_with_fvcore_swin_t_small():
    """The Swin-T backbone (windows, patch merging, relative position bias) at a small size: the default suite's
    cheap version of the 800x1088 check below."""
    encoder, kwargs = MODELS["proscale"]
    _assert_agrees_with_fvcore(build_mask2former(encoder, "swin_t", **kwargs), 64, 96)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["r50", "swin_t"])
@pytest.mark.parametrize("name", list(MODELS))
def test_count_flops_agrees_with_fvcore_coco_size(name, backbone):
    encoder, kwargs = MODELS[name]
    _assert_agrees_with_fvcore(build_mask2former(encoder, backbone, **kwargs), 800, 1088)


def test_count_flops_m2f_r50_coco_breakdown():
    """M2F R50 at 800x1088 (meta model), fvcore conventions (one multiply-add = one flop).

    Exact: the 6 encoder layers over the 25x34 + 50x68 + 100x136 tokens, per token value/output projections
    (2 x 256^2), offsets + attention weights (256 x (192 + 96)), FFN (2 x 256 x 1024), bilinear sampling
    (4 per sampled value: 8 heads x 32 channels x 3 levels x 4 points) and two LayerNorms (5 per element); the
    1x1 mask projection at stride 4. Approximate (+-0.1): the published per-part counts of an independent
    fvcore count of the same model (backbone 71.3 G, pixel decoder 122.2 G of which the mask projection is
    3.6 G and the layers 79.7 G), which the PRO-SCALE paper's GFLOP protocol (arXiv 2404.14657, Mask2Former's
    tools/analyze_model.py) reproduces; test_count_flops_agrees_with_fvcore_* checks fvcore itself."""
    flops = count_flops(build_mask2former("m2f", device="meta"), image_size=None, orig_size=(480, 640))
    tokens = 25 * 34 + 50 * 68 + 100 * 136
    per_token_layer = 2 * 256 * 256 + 256 * (192 + 96) + 2 * 256 * 1024 + 4 * 8 * 32 * 3 * 4 + 2 * 5 * 256
    assert flops["encoder_layers"] * 1e9 == 6 * tokens * per_token_layer
    assert flops["mask_projection"] * 1e9 == 256 * 256 * 200 * 272
    assert flops["encoder_layers"] == pytest.approx(79.7, abs=0.05)
    assert flops["encoder"] == pytest.approx(122.2 - 3.6, abs=0.1)
    assert flops["backbone"] == pytest.approx(71.3, abs=0.1)
    assert flops["postprocess"] * 1e9 == postprocess_flops(100, 133, (800, 1088), (480, 640))
    parts = ("backbone", "encoder", "mask_projection", "transformer_decoder", "other", "postprocess")
    assert flops["total"] == pytest.approx(sum(flops[k] for k in parts))
    assert set(flops) == set(PART_KEYS)


def test_count_flops_average():
    model = build_mask2former("m2f", device="meta")
    # short side 64, long side <= 128: (48, 64) -> (64, 85) and (50, 64) -> (64, 82), both padded to (64, 96)
    one = count_flops(model, (64, 96), (48, 64))
    mean = count_flops_average(model, [(48, 64), (50, 64)], short_side=64, max_size=128)
    post = [postprocess_flops(100, 133, (64, 96), orig) / 1e9 for orig in [(48, 64), (50, 64)]]
    for key in PART_KEYS:
        if key == "postprocess":
            assert mean[key] == pytest.approx(sum(post) / 2)
        elif key == "total":
            assert mean[key] == pytest.approx(one["total"] - one["postprocess"] + sum(post) / 2)
        else:
            assert mean[key] == pytest.approx(one[key])
    with pytest.raises(ValueError, match="empty"):
        count_flops_average(model, [])


def test_bad_inputs():
    with pytest.raises(ValueError, match="no submodule 'backbone'"):
        count_flops(TinyNet())
    with pytest.raises(ValueError, match="no submodule"):
        count_params(TinyNet())
    with pytest.raises(ValueError, match="at least 32x32"):
        count_flops(build_mask2former("m2f", device="meta"), (16, 16))


def test_count_params_parts():
    model = build_mask2former("m2f", device="meta")
    params = count_params(model)
    assert params["total"] == sum(p.numel() for p in model.parameters())
    parts = ("backbone", "encoder", "mask_projection", "transformer_decoder", "other")
    assert sum(params[k] for k in parts) == params["total"]
    assert params["mask_projection"] == 256 * 256 + 256
    assert params["encoder_layers"] == sum(p.numel() for p in model.pixel_decoder.encoder.parameters())
    assert params["total"] == pytest.approx(44e6, rel=0.02)  # M2F R50: 44 M (M2F paper)


# ---------------------------------------------------------------------------------------------------------------
# Hydra-built models: the paper's numbers and the table script


def load_flops_script():
    """``scripts/flops.py`` as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "flops.py"
    spec = importlib.util.spec_from_file_location("proscale_scripts_flops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_numbers_within_one_and_a_half_points():
    from proscale.analysis.flop_table import compare_paper_numbers, paper_number_rows

    comparison = compare_paper_numbers(paper_number_rows())
    assert [c["paper"] for c in comparison] == [54.04, 50.38, 80.43, 51.98]
    for item in comparison:
        assert abs(item["difference"]) <= 1.5, item


def test_flops_script_table_and_single_model(tmp_path, capsys):
    main = load_flops_script().main

    out = tmp_path / "flops"
    argv = ["--table", "--backbones", "r50", "--models", "proscale_111", "--lpe", "on", "--out", str(out)]
    assert main(argv) == 0
    with open(out / "flops_table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["backbone"], r["model"], r["lpe"]) for r in rows] == [("r50", "PRO-SCALE (1,1,1)", "True")]
    assert 78 < float(rows[0]["encoder_reduction_pct"]) < 82  # vs M2F R50 (counted as the reference)
    assert (out / "compute_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PRO-SCALE (1,1,1)" in (out / "flops_table.md").read_text()
    assert not list(out.glob(".*.tmp-*"))
    assert main(["model/backbone=r50", "model/encoder=m2f", "model.num_classes=133", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformer_decoder" in printed and (out / "model_flops.csv").exists()


def test_measured_ms_times_pixel_decoder_and_forward():
    from proscale.analysis.flop_speed import measured_ms

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 1)
            self.pixel_decoder = nn.Conv2d(4, 4, 1)

        def forward(self, images):
            return self.pixel_decoder(self.backbone(images))

    ms = measured_ms(StandIn(), (32, 48), repeats=2)
    assert set(ms) == {"encoder_ms", "forward_ms"} and all(v > 0 for v in ms.values())


@pytest.mark.slow
def test_flops_script_speed_columns(tmp_path):
    main = load_flops_script().main
    argv = ["--table", "--backbones", "r50", "--models", "m2f", "--speed", "--speed-size", "64", "64"]
    assert main([*argv, "--speed-repeats", "1", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "flops_table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(r["encoder_ms"]) > 0 and float(r["forward_ms"]) > 0 for r in rows)
    assert "forward ms" in (tmp_path / "flops_table.md").read_text()


@pytest.mark.slow
def test_full_flops_table(tmp_path):
    main = load_flops_script().main

    assert main(["--table", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "flops_table.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 9 * 2
    with open(tmp_path / "paper_numbers.csv") as handle:
        assert all(abs(float(r["difference"])) <= 1.5 for r in csv.DictReader(handle))


def test_compute_analysis_uses_the_same_config_tree_as_the_apps(monkeypatch, tmp_path):
    """Flop tables read the config tree the console scripts read (``proscale.cli.CONFIG_DIR``, which honours
    PROSCALE_CONFIG_DIR), not a path of their own; a missing tree is named with the variable that fixes it."""
    from hydra.core.global_hydra import GlobalHydra

    import proscale.cli
    from proscale.analysis.flop_table import compose_model_config

    GlobalHydra.instance().clear()
    monkeypatch.setattr(proscale.cli, "CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nowhere.*PROSCALE_CONFIG_DIR"):
        compose_model_config(["experiment=tiny"])
