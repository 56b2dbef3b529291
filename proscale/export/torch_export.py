"""``torch.export``: an ``ExportedProgram`` (``.pt2``) for users who stay in PyTorch.

Same exportable formulation and graph as the ONNX export (:mod:`proscale.export.onnx_export`); the
:class:`~proscale.export.metadata.DeployMetadata` rides along as a JSON extra file of the archive.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from proscale.export.graph import (
    FinalOutputs,
    check_dynamic_trace_size,
    check_image_size,
    dynamic_shapes_spec,
    example_images,
)
from proscale.export.kernels import exportable
from proscale.export.metadata import DeployMetadata
from proscale.utils.io import atomic_write_bytes

METADATA_FILE = "proscale_metadata.json"


def export_program(model: nn.Module, image_size: Sequence[int], dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``images (1, 3, H, W) -> (pred_logits, pred_masks)``; H, W symbolic if ``dynamic``."""
    size = check_image_size(image_size)
    if dynamic:
        check_dynamic_trace_size(model, size)
    with exportable(model), torch.no_grad():
        return torch.export.export(
            FinalOutputs(model), (example_images(size),), dynamic_shapes=dynamic_shapes_spec() if dynamic else None
        )


def export_torch(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: Sequence[int],
    dynamic: bool = False,
    metadata: DeployMetadata | None = None,
) -> Path:
    """Export and save with ``torch.export.save`` to ``path`` (atomically); returns the path."""
    size = check_image_size(image_size)
    program = export_program(model, size, dynamic)
    metadata = metadata or DeployMetadata(size, dynamic, 1, int(getattr(model, "num_classes", -1)))
    metadata = replace(metadata, image_size=size, dynamic=dynamic, batch_size=1, exporter="torch.export", opset=None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata.to_props())})
    return atomic_write_bytes(path, buffer.getvalue())


def load_torch_export(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, DeployMetadata]:
    """Load a ``.pt2`` written by :func:`export_torch`: the program (call ``.module()(images)``) and metadata."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such exported program")
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as error:
        raise ValueError(f"cannot load exported program {path}: {type(error).__name__}: {error}") from None
    props = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
    return program, DeployMetadata.from_props(props, source=str(path))


__all__ = ["export_program", "export_torch", "load_torch_export"]
