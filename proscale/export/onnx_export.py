"""Export a Mask2Former / PRO-SCALE model to ONNX, fixed or dynamic input size.

Exporter choice (both verified against ONNX Runtime in ``tests/test_export.py``):

- fixed size: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, opset 17). It traces one
  forward at the export size; fast (seconds) and proven on these models.
- dynamic size: the dynamo exporter (``dynamo=True``, opset 18, needs ``onnxscript``). The TorchScript
  tracer turns the model's Python-int spatial shapes (token counts of every stage, split sizes, the masked
  attention's target sizes) into constants, so a "dynamic" trace would be silently wrong at other sizes;
  ``torch.export`` keeps them symbolic (:mod:`proscale.models.ops.graph_capture`).

Both run the exportable formulation of the model (:func:`proscale.export.kernels.exportable`).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from proscale.export.deps import require
from proscale.export.graph import (
    FinalOutputs,
    check_dynamic_trace_size,
    check_image_size,
    dynamic_shapes_spec,
    example_images,
)
from proscale.export.kernels import exportable
from proscale.export.metadata import INPUT_NAME, OUTPUT_NAMES, DeployMetadata
from proscale.utils.io import atomic_write_bytes

FIXED_SIZE_OPSET = 17
DYNAMIC_OPSET = 18
# GridSample (the deformable sampling) exists from opset 16; the dynamo exporter's op library targets 18+.
MIN_OPSET = {"torchscript": 16, "dynamo": 18}


def onnx_exporter(dynamic: bool) -> str:
    return "dynamo" if dynamic else "torchscript"


def check_opset(opset: int | None, dynamic: bool) -> int:
    """The opset to export with (default per exporter); ValueError for one the graph cannot use."""
    exporter = onnx_exporter(dynamic)
    if opset is None:
        return DYNAMIC_OPSET if dynamic else FIXED_SIZE_OPSET
    if int(opset) < MIN_OPSET[exporter]:
        reason = (
            "the deformable attention's sampling is exported as GridSample, added in opset 16"
            if exporter == "torchscript"
            else "the dynamo exporter (dynamic sizes) supports opset 18 and newer"
        )
        raise ValueError(
            f"opset={opset} cannot export this model{' with dynamic=true' if dynamic else ''}: {reason}; "
            f"use opset >= {MIN_OPSET[exporter]} (default {check_opset(None, dynamic)})"
        )
    return int(opset)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: Sequence[int],
    dynamic: bool = False,
    opset: int | None = None,
    metadata: DeployMetadata | None = None,
) -> Path:
    """Export ``model`` (a :class:`~proscale.models.Mask2Former`) to the ONNX file ``path``, written atomically.

    Args:
        image_size: [H, W] to trace at (multiples of 32); with ``dynamic=False`` the only size the file accepts.
        dynamic: H and W free (multiples of 32, 64..4096 px); the batch size stays 1.
        opset: ONNX opset (default 17 fixed / 18 dynamic).
        metadata: stored as ``metadata_props`` (default: size, dynamic flag and class count only).

    The graph: input ``images`` (1, 3, H, W) float32, normalized; outputs ``pred_logits`` (1, Q, K+1) and
    ``pred_masks`` (1, Q, H/4, W/4).
    """
    onnx = require("onnx")
    size = check_image_size(image_size)
    opset = check_opset(opset, dynamic)
    exporter = onnx_exporter(dynamic)
    if dynamic:
        require("onnxscript")
        check_dynamic_trace_size(model, size)
    metadata = metadata or DeployMetadata(size, dynamic, 1, int(getattr(model, "num_classes", -1)))
    metadata = replace(metadata, image_size=size, dynamic=dynamic, batch_size=1, exporter=exporter, opset=opset)
    images = example_images(size)
    with exportable(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / exporter chatter (e.g. TracerWarnings on shape asserts)
        graph = FinalOutputs(model)
        if dynamic:
            program = torch.onnx.export(
                graph,
                (images,),
                dynamo=True,
                dynamic_shapes=dynamic_shapes_spec(),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                verbose=False,
            )
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(
                graph,
                (images,),
                buffer,
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                do_constant_folding=True,
            )
            proto = onnx.load_model_from_string(buffer.getvalue())
    for key, value in metadata.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    serialized = proto.SerializeToString()
    return atomic_write_bytes(path, serialized)


__all__ = ["DYNAMIC_OPSET", "FIXED_SIZE_OPSET", "check_opset", "export_onnx"]
