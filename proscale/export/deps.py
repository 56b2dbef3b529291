"""The optional deployment dependencies (``pip install 'proscale[deploy]'``), imported on first use."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'proscale[deploy]'"
# What each step needs: writing ONNX files (onnx; onnxscript for the dynamo exporter), running them (onnxruntime).
PURPOSE = {
    "onnx": "reading and writing ONNX files",
    "onnxruntime": "running exported ONNX models",
    "onnxscript": "the dynamic-shape ONNX exporter (torch.onnx.export(dynamo=True))",
}


class MissingDeployDependency(ImportError):
    """An optional deployment package is not installed; the message says which and how to install it."""


def require(name: str) -> ModuleType:
    """Import the optional package ``name`` or raise :class:`MissingDeployDependency` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise MissingDeployDependency(
            f"{name} is needed for {PURPOSE.get(name, 'deployment')} but cannot be imported ({error}). "
            f"Install the deployment extras: {INSTALL_HINT}"
        ) from error


__all__ = ["INSTALL_HINT", "MissingDeployDependency", "require"]
