"""The export matrix (slow): M2F and PRO-SCALE (two schedules) x LPE on/off x R50 / Swin-T, ONNX Runtime vs
PyTorch; dynamic-size ONNX at sizes other than the export size. Fast tiny versions live in test_export.py."""

from __future__ import annotations

import pytest
import torch
from helpers.export import build, model_config, relative_error

from proscale.export import export_onnx, export_program

SIZE = (64, 96)
OTHER_SIZES = ((96, 64), (128, 160))
# Swin: dynamic exports trace at >= 256 px (>= 2 windows at stride 32; see check_dynamic_trace_size)
SWIN_SIZE, SWIN_OTHER_SIZES = (256, 256), ((288, 256), (256, 480))
TOLERANCE = 1e-4
ENCODERS = [("m2f", None), ("proscale", (3, 3, 3)), ("proscale", (1, 1, 1))]


def torch_outputs(model, images):
    with torch.no_grad():
        out = model(images)
    return out["pred_logits"], out["pred_masks"]


def check_runtime(model, path, sizes):
    from proscale.export.runtime import OnnxRuntimeModel

    runtime = OnnxRuntimeModel(path, num_threads=1)
    for size in sizes:
        images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        out = runtime(images)
        logits, masks = torch_outputs(model, images)
        assert out["pred_masks"].shape == masks.shape
        assert relative_error(out["pred_logits"], logits) < TOLERANCE, size
        assert relative_error(out["pred_masks"], masks) < TOLERANCE, size


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["r50", "swin_t"])
@pytest.mark.parametrize("lpe", [True, False])
@pytest.mark.parametrize(("encoder", "schedule"), ENCODERS)
def test_fixed_size_onnx_matrix(tmp_path, encoder, schedule, lpe, backbone):
    model = build(model_config(encoder, schedule or (1, 1, 1), lpe=lpe, backbone=backbone))
    path = export_onnx(model, tmp_path / "model.onnx", SIZE)
    check_runtime(model, path, [SIZE])


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny", "swin_t"])
@pytest.mark.parametrize(("encoder", "schedule"), ENCODERS[:2])
def test_dynamic_onnx_at_other_sizes(tmp_path, encoder, schedule, backbone):
    model = build(model_config(encoder, schedule or (1, 1, 1), lpe=True, backbone=backbone))
    size, others = (SIZE, OTHER_SIZES) if backbone != "swin_t" else (SWIN_SIZE, SWIN_OTHER_SIZES)
    path = export_onnx(model, tmp_path / "dynamic.onnx", size, dynamic=True)
    check_runtime(model, path, [size, *others])


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["r50", "swin_t"])
def test_dynamic_torch_export_matrix(backbone):
    model = build(model_config("proscale", (3, 3, 3), lpe=True, backbone=backbone))
    size, others = (SIZE, OTHER_SIZES) if backbone != "swin_t" else (SWIN_SIZE, SWIN_OTHER_SIZES)
    program = export_program(model, size, dynamic=True).module()
    for size in others:
        images = torch.randn(1, 3, *size)
        logits, masks = program(images)
        expected_logits, expected_masks = torch_outputs(model, images)
        assert relative_error(logits, expected_logits) < TOLERANCE
        assert relative_error(masks, expected_masks) < TOLERANCE
