"""Run an exported ONNX file in ONNX Runtime behind the torch model's interface.

``OnnxRuntimeModel(path)(images)`` takes what :class:`~proscale.models.Mask2Former` takes and returns the
two tensors post-processing reads (``Mask2FormerInference`` ignores the missing ``aux_outputs``), so code
written around ``model(images)`` runs unchanged on an exported file; the file's
:class:`~proscale.export.metadata.DeployMetadata` (classes, inference settings, test-time transforms) is
``.metadata``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from proscale.export.deps import require
from proscale.export.metadata import INPUT_NAME, OUTPUT_NAMES, DeployMetadata
from proscale.models.mask2former import check_images


class OnnxRuntimeModel:
    """An ONNX file written by :func:`proscale.export.export_onnx`, callable like the torch model.

    Args:
        path: the ``.onnx`` file.
        num_threads: ONNX Runtime intra-op threads (None: its default, all cores).
        providers: execution providers (default CPU).
        optimization: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disabled"`` graph optimisations.
        profile_prefix: if set, ONNX Runtime writes a per-node profile (``end_profiling()`` returns its path).

    __call__(images (B, 3, H, W) float, normalized, H and W multiples of 32) ->
        {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4)} float32 CPU tensors. A fixed-size file
        accepts only its export size (ValueError naming both sizes otherwise); batches run image by image
        when the file's batch size is 1.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_threads: int | None = None,
        providers: list[str] | None = None,
        optimization: str = "all",
        profile_prefix: str | None = None,
    ) -> None:
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"onnx={self.path}: no such file")
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimization not in levels:
            raise ValueError(f"optimization={optimization!r}: choose one of {sorted(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"ONNX Runtime cannot load {self.path}: {error}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = DeployMetadata.from_props(props, source=str(self.path))
        self.num_classes = self.metadata.num_classes

    def eval(self) -> OnnxRuntimeModel:  # drop-in for code that calls model.eval()
        return self

    def check_input_size(self, images: Tensor) -> None:
        """ValueError for a wrong layout, or a size other than the export size of a fixed-size file."""
        check_images(images)
        size = tuple(int(v) for v in images.shape[-2:])
        if not self.metadata.dynamic and size != tuple(self.metadata.image_size):
            expected = "x".join(map(str, self.metadata.image_size))
            raise ValueError(
                f"{self.path.name} was exported for fixed {expected} inputs, got {size[0]}x{size[1]}: "
                f"resize/pad images to {expected} (the test-time transform in its metadata does), or re-export "
                "with dynamic=true"
            )

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        self.check_input_size(images)
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        step = self.metadata.batch_size
        pieces = [
            self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array[start : start + step]})
            for start in range(0, array.shape[0], step)
        ]
        return {
            name: torch.from_numpy(np.concatenate([piece[i] for piece in pieces]))
            for i, name in enumerate(OUTPUT_NAMES)
        }

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (``profile_prefix`` given); returns the JSON trace's path."""
        return self.session.end_profiling()


__all__ = ["OnnxRuntimeModel"]
