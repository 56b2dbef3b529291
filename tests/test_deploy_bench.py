"""The deployment benchmark's profile parsing and report (synthetic ONNX Runtime trace; no timing)."""

import json

import pytest

from proscale.analysis.deploy_bench import markdown, node_profile, profile_shares


def event(name, op, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "args": {"op_name": op}}


def test_profile_shares_of_encoder_sampling_and_gather(tmp_path):
    trace = [
        event("/model/backbone/conv1/Conv", "Conv", 500),
        event("/model/pixel_decoder/encoder/layers.0/self_attn/GridSample", "GridSample", 200),
        event("/model/pixel_decoder/encoder/layers.0/self_attn/GridSample", "GridSample", 100),  # 2nd run
        event("/model/pixel_decoder/encoder/layers.0/Gather_3", "Gather", 50),
        event("/model/pixel_decoder/encoder/layers.0/linear1/Gemm", "Gemm", 150),
        {"cat": "Session", "name": "model_run", "dur": 99999},  # not a node: ignored
    ]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(trace))
    nodes = node_profile(path)
    assert sorted(n["us"] for n in nodes) == [50, 150, 300, 500]
    shares = profile_shares(nodes)
    assert shares["encoder_share"] == pytest.approx(500 / 1000)
    assert shares["sampling_share"] == pytest.approx(300 / 1000)
    assert shares["gather_share"] == pytest.approx(50 / 1000)
    assert shares["sampling_share_of_encoder"] == pytest.approx(300 / 500)
    assert shares["top_encoder_ops"].startswith("GridSample 30.0%")


def test_markdown_reports_ratios_and_the_sampling_verdict():
    row = {
        "label": "M2F", "gflops": 200.0, "eager_ms": 1000.0, "ort_ms": 800.0, "ort_noopt_ms": 1200.0,
        "encoder_share": 0.5, "sampling_share": 0.3, "gather_share": 0.0, "sampling_share_of_encoder": 0.6,
        "top_encoder_ops": "GridSample 30.0%", "exported_nodes": 10, "optimized_nodes": 5,
        "exported_sampling_nodes": 18, "optimized_sampling_nodes": 18, "fused_ops": "FusedMatMul 3",
    }  # fmt: skip
    settings = {"image_size": [800, 1088], "threads": 2, "repeats": 5, "batch": 1}
    text = markdown({"rows": [row], "settings": settings}, "python scripts/benchmark.py --deploy")
    assert "| M2F | 200.0 | 1000 | 800 | 0.80 | 1200 |" in text
    assert "the deformable sampling dominates the encoder (60% of its node time, 30% of the whole graph's)" in text
    assert "Command: `python scripts/benchmark.py --deploy`" in text
