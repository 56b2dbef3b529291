"""Compute / memory switches of :class:`~proscale.models.Mask2Former`: ``model.compile`` and ``model.checkpointing``.

Both take ``false`` (off), ``true`` (every part) or a part name / list of part names:

- ``model.compile``: parts ``backbone``, ``encoder`` (the pixel decoder's multi-scale encoder), ``decoder`` (the
  masked-attention transformer decoder) are run through ``torch.compile``. A part that fails to compile
  (an unsupported op, a backend error) runs eagerly from then on, with a warning that names it. Without a
  working compiler backend at all (no C++ compiler for inductor on CPU, no triton on CUDA) the model refuses
  to build with a message that says so (:func:`check_compiler`).
- ``model.checkpointing``: parts ``encoder`` (every deformable encoder layer) and ``decoder`` (every masked-attention
  decoder layer) keep only their inputs while training and recompute their activations in the backward pass
  (``torch.utils.checkpoint``, non-reentrant): less activation memory for one more forward of those layers.
  Gradients are the same (the layers are deterministic and dropout is 0).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

COMPILE_PARTS = ("backbone", "encoder", "decoder")
CHECKPOINT_PARTS = ("encoder", "decoder")


def parse_parts(value: Any, allowed: tuple[str, ...], key: str) -> tuple[str, ...]:
    """``false``/``null``/``none``/``[]`` -> (); ``true``/``all`` -> every allowed part; a name, a comma list or a
    list of names -> those parts. Anything else is a ``ValueError`` naming ``key`` and the valid values."""
    if value is None or value is False:
        return ()
    if value is True:
        return allowed
    names: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    try:
        parts = [str(name).strip().lower() for name in names]
    except TypeError:
        raise ValueError(f"{key}={value!r}: expected true/false, a part name or a list of {list(allowed)}") from None
    if parts in (["false"], ["none"], [""], []):
        return ()
    if parts in (["true"], ["all"]):
        return allowed
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"{key}={value!r}: unknown part(s) {unknown}; valid: true, false, or any of {list(allowed)}")
    return tuple(p for p in allowed if p in parts)


@functools.lru_cache(maxsize=4)
def _compiler_problem(device_type: str) -> str | None:
    """Compile and run a two-op function on ``device_type`` once per process; the error text, or None if it works."""
    try:
        device = torch.device(device_type)
        x = torch.arange(4.0, device=device)
        got = torch.compile(lambda t: t * 2 + 1, dynamic=False)(x)
        if not torch.equal(got.cpu(), torch.arange(4.0) * 2 + 1):
            return "the compiled probe returned wrong values"
    except Exception as error:  # any backend failure: missing compiler, missing triton, broken toolchain
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    return None


def check_compiler(device_type: str = "cpu") -> None:
    """Raise ``ValueError`` when ``torch.compile`` cannot build and run a trivial kernel on ``device_type``."""
    problem = _compiler_problem(device_type)
    if problem is not None:
        hint = "triton and a CUDA toolkit" if device_type == "cuda" else "a C++ compiler (g++ or clang; CXX=...)"
        raise ValueError(
            f"model.compile is on, but torch.compile cannot build kernels on {device_type} here ({problem}). "
            f"Install {hint}, or set model.compile=false."
        )


def set_activation_checkpointing(model: nn.Module, parts: tuple[str, ...]) -> None:
    """Switch activation checkpointing on for the encoder layers and/or the decoder layers of ``model``."""
    if "encoder" in parts:
        layers = [m for m in model.pixel_decoder.encoder.modules() if hasattr(type(m), "activation_checkpointing")]
        if not layers:
            warnings.warn(
                f"model.checkpointing: the {type(model.pixel_decoder.encoder).__name__} encoder has no layers that "
                "support activation checkpointing; it runs without",
                stacklevel=2,
            )
        for layer in layers:
            layer.activation_checkpointing = True
    if "decoder" in parts:
        model.transformer_decoder.activation_checkpointing = True


class CompiledParts:
    """Lazily compiled versions of a model's parts, with a per-part eager fallback.

    Not an ``nn.Module`` and not part of the state dict; the model drops it when copied or pickled
    (``__getstate__``) and compiles again on first use.
    """

    def __init__(self, parts: tuple[str, ...], **compile_options: Any) -> None:
        self.parts = parts
        self.options = compile_options
        self.compiled: dict[str, Any] = {}
        self.failed: dict[str, str] = {}

    def __call__(self, name: str, module: nn.Module, *args: Any) -> Any:
        if name not in self.parts or name in self.failed or _on_meta(args):
            # meta tensors: FLOP counting (proscale.analysis.flops) runs the plain modules
            return module(*args)
        compiled = self.compiled.get(name)
        if compiled is None:
            compiled = self.compiled[name] = torch.compile(module, **self.options)
        try:
            return compiled(*args)
        except Exception as error:
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            self.failed[name] = reason
            warnings.warn(f"model.compile: the {name} could not be compiled ({reason}); it runs eagerly", stacklevel=2)
            return module(*args)


def _on_meta(args: tuple) -> bool:
    """Whether the first tensor among ``args`` (tensors or lists of tensors) is a meta tensor."""
    for arg in args:
        first = arg[0] if isinstance(arg, (list, tuple)) and arg else arg
        if isinstance(first, torch.Tensor):
            return first.device.type == "meta"
    return False
