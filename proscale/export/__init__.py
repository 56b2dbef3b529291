"""Deployment: export M2F / PRO-SCALE models to ONNX or ``torch.export`` and run them in ONNX Runtime.

- :func:`export_onnx` / :func:`export_torch` (``scripts/export.py``): a model -> ``.onnx`` / ``.pt2`` with a
  fixed or dynamic input size and the metadata predict needs (:class:`DeployMetadata`);
- :class:`~proscale.export.runtime.OnnxRuntimeModel`: the ONNX file behind the torch model's call interface;
- :func:`exportable`: the model's exportable formulation (reference deformable kernel, fast paths off).

onnx / onnxruntime / onnxscript are optional (``pip install 'proscale[deploy]'``), imported on first use.
"""

from proscale.export.deps import INSTALL_HINT, MissingDeployDependency
from proscale.export.graph import FinalOutputs, check_image_size
from proscale.export.kernels import exportable
from proscale.export.metadata import DeployMetadata
from proscale.export.onnx_export import check_opset, export_onnx
from proscale.export.torch_export import export_program, export_torch, load_torch_export

EXPORT_FORMATS = ("onnx", "torch_export")


def __getattr__(name: str):
    if name == "OnnxRuntimeModel":  # keeps `import proscale.export` free of onnxruntime's import time
        from proscale.export.runtime import OnnxRuntimeModel

        return OnnxRuntimeModel
    raise AttributeError(name)


__all__ = [
    "EXPORT_FORMATS",
    "INSTALL_HINT",
    "DeployMetadata",
    "FinalOutputs",
    "MissingDeployDependency",
    "OnnxRuntimeModel",
    "check_image_size",
    "check_opset",
    "export_onnx",
    "export_program",
    "export_torch",
    "exportable",
    "load_torch_export",
]
