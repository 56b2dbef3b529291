"""Export (ONNX fixed size, torch.export fixed and dynamic) of a tiny PRO-SCALE model, the ONNX Runtime wrapper,
the stored metadata, and the refusals. The full model matrix and dynamic ONNX are in test_export_matrix.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers.export import META, build, model_config, relative_error, write_checkpoint

from proscale.export import (
    DeployMetadata,
    MissingDeployDependency,
    export_onnx,
    export_program,
    export_torch,
    exportable,
    load_torch_export,
)
from proscale.export.graph import FinalOutputs
from proscale.models.ops import MSDeformAttn
from proscale.models.ops.inference_gate import fast_inference_allowed

SIZE = (64, 96)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model():
    return build(model_config("proscale", (1, 1, 1), lpe=True))


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    metadata = DeployMetadata(SIZE, False, 1, 3, meta=META, inference={"object_mask_threshold": 0.3})
    return export_onnx(model, path, SIZE, dynamic=False, metadata=metadata)


def torch_outputs(model, images):
    with torch.no_grad():
        out = model(images)
    return out["pred_logits"], out["pred_masks"]


def images_at(size, seed=0, batch=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("encoder", "schedule", "lpe"), [("m2f", None, False), ("proscale", (3, 3, 3), False)])
def test_other_encoders_export_to_onnx(tmp_path, encoder, schedule, lpe):
    from proscale.export.runtime import OnnxRuntimeModel

    other = build(model_config(encoder, schedule or (1, 1, 1), lpe=lpe))
    runtime = OnnxRuntimeModel(export_onnx(other, tmp_path / "m.onnx", SIZE), num_threads=1)
    images = images_at(SIZE, seed=11)
    out = runtime(images)
    logits, masks = torch_outputs(other, images)
    assert relative_error(out["pred_logits"], logits) < TOLERANCE
    assert relative_error(out["pred_masks"], masks) < TOLERANCE


def test_exportable_switches_kernels_and_fast_paths_and_restores_them(model):
    attention = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    tokens = torch.zeros(1, 4, 32)
    assert attention and all(m.impl is None for m in attention)
    with exportable(model):
        assert all(m.impl == "grid_sample" for m in attention)
        assert not fast_inference_allowed(model, tokens)
    assert all(m.impl is None for m in attention)
    with torch.no_grad():
        assert fast_inference_allowed(model, tokens)


def test_onnx_runtime_equals_pytorch_and_carries_metadata(model, onnx_file):
    from proscale.export.runtime import OnnxRuntimeModel

    runtime = OnnxRuntimeModel(onnx_file, num_threads=1)
    assert runtime.metadata.image_size == SIZE and runtime.metadata.dynamic is False
    assert runtime.metadata.meta == META and runtime.metadata.inference == {"object_mask_threshold": 0.3}
    assert runtime.metadata.exporter == "torchscript" and runtime.metadata.opset == 17
    images = images_at(SIZE, batch=2)  # run image by image (batch 1 export)
    out = runtime(images)
    logits, masks = torch_outputs(model, images)
    assert out["pred_logits"].shape == logits.shape == (2, 6, 4)
    assert out["pred_masks"].shape == masks.shape == (2, 6, 16, 24)
    assert relative_error(out["pred_logits"], logits) < TOLERANCE
    assert relative_error(out["pred_masks"], masks) < TOLERANCE


def test_onnx_metadata_props_in_the_file(onnx_file):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["proscale.image_size"]) == list(SIZE)
    assert json.loads(props["proscale.dynamic"]) is False
    assert json.loads(props["proscale.meta"])["class_names"] == META["class_names"]


def test_panoptic_result_through_onnx_runtime_equals_pytorch(model, onnx_file):
    from proscale.export.runtime import OnnxRuntimeModel

    runtime = OnnxRuntimeModel(onnx_file, num_threads=1)
    inference = runtime.metadata.build_inference(overlap_threshold=0.5)  # classes + threshold from the file
    assert inference.thing_classes == [0] and inference.object_mask_threshold == 0.3
    segments_seen = 0
    for seed in range(3):
        # synthetic scenes: a bright rectangle on a noisy background, at the export size
        images = images_at(SIZE, seed=seed) * 0.2
        images[:, :, 8 + 8 * seed : 40, 16 : 48 + 8 * seed] += 2.0
        sizes, orig = [(60, 90)], [(120, 180)]
        with torch.no_grad():
            expected = inference(model(images), sizes, orig)[0]["panoptic_seg"]
        got = inference(runtime(images), sizes, orig)[0]["panoptic_seg"]
        assert torch.equal(got[0], expected[0])
        assert [(s["id"], s["category_id"], s["area"]) for s in got[1]] == [
            (s["id"], s["category_id"], s["area"]) for s in expected[1]
        ]
        assert [s["score"] for s in got[1]] == pytest.approx([s["score"] for s in expected[1]], rel=1e-4)
        segments_seen += len(expected[1])
    assert segments_seen > 0  # the comparison covered actual segments


def test_fixed_size_export_refuses_other_sizes_clearly(onnx_file):
    from proscale.export.runtime import OnnxRuntimeModel

    runtime = OnnxRuntimeModel(onnx_file, num_threads=1)
    with pytest.raises(ValueError, match=r"exported for fixed 64x96 inputs, got 96x64.*dynamic=true"):
        runtime(images_at((96, 64)))
    with pytest.raises(ValueError, match="multiple of 32"):
        runtime(torch.zeros(1, 3, 64, 90))


def test_torch_export_round_trip(model, tmp_path):
    path = export_torch(model, tmp_path / "tiny.pt2", SIZE, metadata=DeployMetadata(SIZE, False, 1, 3, meta=META))
    program, metadata = load_torch_export(path)
    assert metadata.meta == META and metadata.exporter == "torch.export" and metadata.image_size == SIZE
    images = images_at(SIZE, seed=3)
    logits, masks = program.module()(images)
    expected_logits, expected_masks = torch_outputs(model, images)
    assert relative_error(logits, expected_logits) < TOLERANCE
    assert relative_error(masks, expected_masks) < TOLERANCE


def test_dynamic_torch_export_is_correct_at_other_sizes(model):
    program = export_program(model, SIZE, dynamic=True).module()
    for size in ((96, 64), (128, 160)):
        images = images_at(size, seed=sum(size))
        logits, masks = program(images)
        expected_logits, expected_masks = torch_outputs(model, images)
        assert masks.shape[-2:] == (size[0] // 4, size[1] // 4)
        assert relative_error(logits, expected_logits) < TOLERANCE
        assert relative_error(masks, expected_masks) < TOLERANCE


def test_the_fast_paths_do_not_leak_into_a_capture(model):
    """The no_grad fast paths trace into wrong graphs (out= buffers, in-place chunk loops); the gate turns them
    off under any graph capture, so with only the kernel switched a plain torch.export is right too."""
    images = images_at(SIZE, seed=5)
    attention = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    try:
        for module in attention:
            module.impl = "grid_sample"
        with torch.no_grad():
            program = torch.export.export(FinalOutputs(model), (images,)).module()
    finally:
        for module in attention:
            module.impl = None
    assert relative_error(program(images)[1], torch_outputs(model, images)[1]) < TOLERANCE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 15}, r"opset=15 cannot export.*GridSample, added in opset 16"),
        ({"opset": 17, "dynamic": True}, r"opset=17 cannot export this model with dynamic=true.*>= 18"),
        ({"image_size": (64, 90)}, r"W=90 must be a multiple of 32"),
    ],
)
def test_bad_export_requests_are_refused(model, tmp_path, kwargs, message):
    kwargs = {"image_size": SIZE, **kwargs}
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "bad.onnx", **kwargs)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_dynamic_swin_export_must_trace_above_one_window(tmp_path):
    swin = build(model_config("m2f", lpe=False, backbone="swin_t"))
    with pytest.raises(ValueError, match=r"windowed backbone \(Swin, window 7\) must trace at >= 256 px.*\[64, 96\]"):
        export_program(swin, SIZE, dynamic=True)
    with pytest.raises(ValueError, match=r"must trace at >= 256 px"):
        export_onnx(swin, tmp_path / "swin.onnx", SIZE, dynamic=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_optional_dependency_names_the_extra(model, onnx_file, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what an absent package looks like to `import`
    with pytest.raises(MissingDeployDependency, match=rf"{missing} is needed.*pip install 'proscale\[deploy\]'"):
        if missing in ("onnx", "onnxscript"):
            export_onnx(model, tmp_path / "x.onnx", SIZE, dynamic=missing == "onnxscript")
        else:
            from proscale.export.runtime import OnnxRuntimeModel

            OnnxRuntimeModel(onnx_file)
    assert not (tmp_path / "x.onnx").exists()


def test_a_file_without_metadata_is_refused(model, tmp_path):
    from proscale.export.runtime import OnnxRuntimeModel

    path = tmp_path / "plain.onnx"
    with exportable(model), torch.no_grad():
        torch.onnx.export(FinalOutputs(model), (images_at(SIZE),), str(path), dynamo=False, input_names=["images"])
    with pytest.raises(ValueError, match=r"plain.onnx carries no proscale metadata.*scripts/export.py"):
        OnnxRuntimeModel(path)


def test_export_app_from_a_checkpoint(model, tmp_path):
    from proscale.export.runtime import OnnxRuntimeModel
    from proscale.export.task import export
    from proscale.utils.hydra_utils import compose_config

    config = model_config("proscale", (1, 1, 1), lpe=True)
    checkpoint = write_checkpoint(model, config, tmp_path / "tiny.ckpt")
    output = tmp_path / "out" / "tiny.onnx"
    cfg = compose_config(
        "export",
        [
            f"weights={checkpoint}",
            f"output={output}",
            "image_size=[64,96]",
            "num_threads=1",
            f"paths.log_dir={tmp_path}",
        ],
        output_dir=tmp_path / "run",
    )
    metrics, _ = export(cfg)
    assert metrics["max_relative_difference"] < TOLERANCE
    runtime = OnnxRuntimeModel(output)
    assert runtime.metadata.meta == META
    assert runtime.metadata.inference == {"object_mask_threshold": 0.3, "overlap_threshold": 0.5}  # from the file
    assert runtime.metadata.test_transforms[0]["short_edge"] == 64
    assert runtime.metadata.model_config["encoder"]["schedule"] == [1, 1, 1]
    images = images_at(SIZE, seed=7)
    assert relative_error(runtime(images)["pred_masks"], torch_outputs(model, images)[1]) < TOLERANCE


def test_export_app_refuses_an_unknown_format(tmp_path):
    from proscale.export.task import export
    from proscale.utils.hydra_utils import compose_config

    cfg = compose_config(
        "export",
        ["weights=x.ckpt", "output=x.trt", "format=tensorrt", f"paths.log_dir={tmp_path}"],
        output_dir=tmp_path,
    )
    with pytest.raises(ValueError, match=r"format='tensorrt': choose one of \['onnx', 'torch_export'\]"):
        export(cfg)
