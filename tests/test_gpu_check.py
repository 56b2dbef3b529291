"""`scripts/gpu_check.py` on a machine without CUDA: says so, runs its CPU part, writes the report, exits 0."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_without_cuda_runs_the_cpu_part_and_exits_0(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    # one model and backbone keep the CPU part short here; the script itself counts all six
    monkeypatch.setattr(gpu_check, "MODELS", {"M2F": gpu_check.MODELS["M2F"]})
    monkeypatch.setattr(gpu_check, "BACKBONES", {"R50": gpu_check.BACKBONES["R50"]})
    assert gpu_check.main(["--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda_available"] is False and report["errors"] == {}
    assert report["gflops"]["models"]["M2F, R50"]["total_gflops"] == pytest.approx(223.4, abs=0.1)
    bf16 = report["precision"]["steps"]["bf16"]
    assert bf16["finite"] and bf16["sampling_fp32"] and len(bf16["losses"]) == 3
    text = (tmp_path / "gpu_check.md").read_text()
    assert "**No CUDA device on this machine**" in text and "| M2F, R50 | 223.4 |" in text
