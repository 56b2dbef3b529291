"""When may a module replace its sub-modules by an in-place, no-autograd inference fast path?

One rule for every fast path (pixel decoder tail, encoder layer, deformable attention): the result must be
the same function, and nobody may need what the fast path skips. :func:`fast_inference_allowed` says yes
only when

- the inputs live on the CPU (the fast paths are tuned for it; CUDA and meta tensors run the modules),
- no CPU autocast is active (the modules' autocast casts are not reproduced with ``out=`` buffers),
- no ``TorchDispatchMode`` observes the ops (e.g. a FLOP counter on real tensors must see the module ops),
- no gradient is needed (grad mode off, or neither the inputs nor the module's parameters require one),
- no forward (pre-)hook sits on any sub-module (hooks must see the sub-modules run),
- no graph capture is running (ONNX / ``torch.export`` tracing, :func:`fast_paths_disabled`): the fast paths
  write into ``out=`` buffers and specialise on Python-int shapes, which exporters do not capture faithfully.

Callers add their own structural conditions (dtype, standard module types, dropout off).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

_FAST_PATHS_ENABLED = True


@contextmanager
def fast_paths_disabled() -> Iterator[None]:
    """Within this block every module runs its plain (exportable) path; used by :mod:`proscale.export`."""
    global _FAST_PATHS_ENABLED
    previous, _FAST_PATHS_ENABLED = _FAST_PATHS_ENABLED, False
    try:
        yield
    finally:
        _FAST_PATHS_ENABLED = previous


def fast_inference_allowed(module: nn.Module, *inputs: Tensor) -> bool:
    """True when ``module`` may run its inference fast path on ``inputs`` (see the module docstring)."""
    if not _FAST_PATHS_ENABLED or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    if inputs[0].device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    if torch.is_grad_enabled() and (
        any(t.requires_grad for t in inputs) or any(p.requires_grad for p in module.parameters())
    ):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


__all__ = ["fast_inference_allowed", "fast_paths_disabled"]
