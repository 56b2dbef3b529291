"""On a CUDA device: the model computes what it computes on the CPU, and one training step runs in bf16-mixed.

Skipped without CUDA (``@pytest.mark.gpu``); ``python scripts/gpu_check.py`` is the fuller check (DDP with NCCL,
throughput) and writes benchmarks/gpu_check.md."""

from __future__ import annotations

import hydra
import pytest
import torch

from proscale.utils.hydra_utils import compose_config

pytestmark = pytest.mark.gpu

TINY = [
    "model.num_classes=5",
    "model/backbone=timm",
    "model.backbone.model_name=regnetx_002",
    "model.conv_dim=32",
    "model.mask_dim=32",
    "model.hidden_dim=32",
    "model.num_queries=4",
    "model.dec_layers=2",
    "model.encoder.n_heads=4",
    "model.encoder.dim_feedforward=64",
]


@pytest.mark.parametrize("encoder", ["m2f", "proscale"])
def test_cuda_forward_equals_cpu(encoder, tmp_path):
    cfg = compose_config("train", [f"model/encoder={encoder}", *TINY], output_dir=tmp_path)
    model = hydra.utils.instantiate(cfg.model).eval()
    images = torch.randn(2, 3, 64, 96)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        cpu = model(images)
        gpu = model.cuda()(images.cuda())
    for key in ("pred_logits", "pred_masks"):
        assert torch.allclose(gpu[key].cpu(), cpu[key], rtol=1e-4, atol=1e-4), key


def test_cuda_bf16_training_step_is_finite(tmp_path):
    cfg = compose_config("train", ["model/encoder=proscale", *TINY], output_dir=tmp_path)
    model = hydra.utils.instantiate(cfg.model).cuda().train()
    images = torch.randn(2, 3, 64, 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images)
        loss = out["pred_logits"].float().logsumexp(-1).mean() + out["pred_masks"].float().sigmoid().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
