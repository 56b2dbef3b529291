"""Run a model in its exportable formulation: same function, only ops that exporters capture.

What changes inside :func:`exportable` (all restored on exit):

- every :class:`~proscale.models.ops.MSDeformAttn` samples with the reference ``grid_sample`` kernel: the
  default ``gather`` kernel is a custom ``autograd.Function`` whose forward writes into preallocated buffers
  and calls ``embedding_bag`` with per-sample weights (no ONNX equivalent), while ``grid_sample`` maps onto
  ONNX ``GridSample`` (opset >= 16);
- the CPU inference fast paths (pixel-decoder tail, encoder-layer FFN, fused deformable projection) are off
  (:func:`~proscale.models.ops.inference_gate.fast_paths_disabled`): they compute the same values with
  ``out=`` buffers and in-place chunk loops, which a trace would record as a fixed, size-specialised
  sequence;
- the model is in eval mode (dropout off, BatchNorm running statistics).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from proscale.models.ops import MSDeformAttn
from proscale.models.ops.inference_gate import fast_paths_disabled

EXPORT_KERNEL = "grid_sample"


@contextmanager
def exportable(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` runs its exportable formulation (see the module docstring)."""
    attention = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    previous_impls = [m.impl for m in attention]
    was_training = model.training
    model.eval()
    try:
        for module in attention:
            module.impl = EXPORT_KERNEL
        with fast_paths_disabled():
            yield model
    finally:
        for module, impl in zip(attention, previous_impls):
            module.impl = impl
        model.train(was_training)


__all__ = ["EXPORT_KERNEL", "exportable"]
