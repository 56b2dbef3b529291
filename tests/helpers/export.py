"""Small models and files shared by the export tests."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from proscale.models.encoders import ENCODER_TARGET

BACKBONES = {
    "tiny": {"_target_": "proscale.models.backbones.build_backbone", "name": "timm", "model_name": "resnet10t"},
    "r50": {"_target_": "proscale.models.backbones.build_backbone", "name": "r50"},
    "swin_t": {"_target_": "proscale.models.backbones.build_backbone", "name": "swin_t", "drop_path_rate": 0.0},
}
DIM = 32
META = {
    "class_names": ["thing", "stuff-a", "stuff-b"],
    "category_ids": [1, 7, 9],
    "isthing": [True, False, False],
    "ignore_label": 255,
    "colors": [[200, 0, 0], [0, 200, 0], [0, 0, 200]],
}


def model_config(encoder: str = "proscale", schedule=(1, 1, 1), lpe: bool = True, backbone: str = "tiny") -> dict:
    """A tiny Mask2Former config (32 channels, 6 queries, 2 decoder layers, 3 classes) as the checkpoints store."""
    if encoder == "m2f":
        enc = {"_target_": ENCODER_TARGET, "name": "m2f", "d_model": DIM, "num_layers": 2}
    else:
        enc = {"_target_": ENCODER_TARGET, "name": "proscale", "d_model": DIM, "schedule": list(schedule)}
    enc.update(n_heads=2, dim_feedforward=64)
    return {
        "_target_": "proscale.models.Mask2Former",
        "backbone": dict(BACKBONES[backbone]),
        "encoder": enc,
        "num_classes": 3,
        "conv_dim": DIM,
        "mask_dim": DIM,
        "lpe": lpe,
        "num_queries": 6,
        "dec_layers": 2,
        "hidden_dim": DIM,
        "dim_feedforward": 64,
        "nheads": 2,
    }


def build(config: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(OmegaConf.create(config)).eval()
    with torch.no_grad():  # confident classes, so that panoptic post-processing keeps segments
        model.transformer_decoder.class_embed.weight.mul_(20.0)
    return model


def write_checkpoint(model: torch.nn.Module, config: dict, path: Path) -> Path:
    """What this project's Lightning checkpoints hold (``state_dict`` under ``model.``, hyper-parameters)."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {
                "model_config": config,
                "meta": META,
                "inference": {"object_mask_threshold": 0.3, "overlap_threshold": 0.5},
                "test_transforms": [{"_target_": "proscale.data.transforms.ResizeShortestEdge", "short_edge": 64}],
                "ema_decay": None,
            },
            "pytorch-lightning_version": "2.6.0",
        },
        path,
    )
    return path


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
