"""``scripts/export.py`` / ``proscale-export``: weights file -> ``.onnx`` or ``.pt2`` with prediction metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from proscale.export.graph import FinalOutputs, example_images
from proscale.export.metadata import DeployMetadata
from proscale.utils.logging_utils import get_logger
from proscale.utils.task import task_wrapper

log = get_logger(__name__)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def build_from_weights(cfg: DictConfig) -> tuple[torch.nn.Module, DeployMetadata]:
    """The model of ``cfg.weights`` (via the weights API) and the metadata to store beside it."""
    from proscale.weights import command_line_model_overrides, load_weights_into, resolve_model_config
    from proscale.weights.tasks import read_weights_from_cfg

    loaded = read_weights_from_cfg(cfg)
    model_cfg = resolve_model_config(cfg.model, loaded, command_line_model_overrides())
    model = hydra.utils.instantiate(model_cfg)
    load_weights_into(model, loaded, allow_partial=cfg.weights_allow_partial)
    metadata = DeployMetadata(
        image_size=tuple(cfg.image_size),
        dynamic=bool(cfg.dynamic),
        batch_size=1,
        num_classes=int(model.num_classes),
        meta=loaded.meta,
        inference=loaded.inference if loaded.inference is not None else _plain(cfg.inference),
        test_transforms=loaded.test_transforms if loaded.test_transforms is not None else _plain(cfg.test_transforms),
        model_config=_plain(model_cfg),
    )
    return model.eval(), metadata


def verify(model: torch.nn.Module, path: Path, fmt: str, image_size: tuple[int, int]) -> float:
    """Max relative difference of the exported file's outputs to the PyTorch model's (its default kernels and
    fast paths, as evaluation runs it) on one random image."""
    images = example_images(image_size, seed=1)
    with torch.no_grad():
        expected = FinalOutputs(model.eval())(images)
    if fmt == "onnx":
        from proscale.export.runtime import OnnxRuntimeModel

        outputs = OnnxRuntimeModel(path)(images)
        got = (outputs["pred_logits"], outputs["pred_masks"])
    else:
        from proscale.export.torch_export import load_torch_export

        with torch.no_grad():
            got = load_torch_export(path)[0].module()(images)
    return max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)) for g, e in zip(got, expected))


@task_wrapper
def export(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export ``cfg.weights`` to ``cfg.output`` (``format``: onnx | torch_export); returns ({}, {"output"})."""
    from proscale.export import EXPORT_FORMATS, check_image_size, check_opset, export_onnx, export_torch

    if cfg.format not in EXPORT_FORMATS:
        raise ValueError(f"format={cfg.format!r}: choose one of {list(EXPORT_FORMATS)}")
    size = check_image_size(cfg.image_size)
    if cfg.format == "onnx":
        check_opset(cfg.opset, cfg.dynamic)  # fail before loading anything
    model, metadata = build_from_weights(cfg)
    output = Path(cfg.output)
    if cfg.format == "onnx":
        export_onnx(model, output, size, dynamic=cfg.dynamic, opset=cfg.opset, metadata=metadata)
    else:
        export_torch(model, output, size, dynamic=cfg.dynamic, metadata=metadata)
    kind = "dynamic (H, W multiples of 32)" if cfg.dynamic else "fixed"
    print(f"exported {cfg.weights} -> {output} ({cfg.format}, {size[0]}x{size[1]}, {kind})")
    metrics: dict[str, Any] = {"bytes": output.stat().st_size}
    if cfg.verify:
        metrics["max_relative_difference"] = verify(model, output, cfg.format, size)
        print(f"verified against PyTorch: max relative difference {metrics['max_relative_difference']:.2e}")
    return metrics, {"output": output}


__all__ = ["build_from_weights", "export", "verify"]
