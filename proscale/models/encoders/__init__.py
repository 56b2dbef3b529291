"""The encoders of the pixel decoder, built by name like the backbones: ``build_encoder(name, **kwargs)``.

Every module of this package is imported here, and each registers its encoder with ``@ENCODERS.register(name)``;
``conf/model/encoder/<name>.yaml`` (``_target_: proscale.models.encoders.build_encoder``, ``name: <name>``) is the
config-group entry of the same name (``tests/test_registries.py`` checks that the two agree). A new encoder is one
module here plus its YAML file: docs/new-encoder.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from proscale.models.encoders.base import ENCODERS, MultiScaleEncoder

for _module in pkgutil.iter_modules(__path__):  # register every encoder of the package
    importlib.import_module(f"{__name__}.{_module.name}")

from proscale.models.encoders.lite_m2f import LiteM2FEncoder  # noqa: E402
from proscale.models.encoders.m2f import M2FEncoder  # noqa: E402
from proscale.models.encoders.proscale import ProScaleEncoder  # noqa: E402
from proscale.models.encoders.rt_m2f import RTM2FEncoder  # noqa: E402
from proscale.models.encoders.trc import TokenRecalibration  # noqa: E402

# the ``_target_`` of every encoder config node
ENCODER_TARGET = "proscale.models.encoders.build_encoder"


def build_encoder(name: str, **kwargs: Any) -> MultiScaleEncoder:
    """``ENCODERS.build`` for Hydra configs: the encoder registered as ``name`` with ``kwargs``."""
    return ENCODERS.build(name, **kwargs)


build_encoder.registry = ENCODERS  # type: ignore[attr-defined]  (config checks look through to the encoder)


def encoder_name(node: Mapping[str, Any] | None) -> str | None:
    """The registry name of an encoder config node: its ``name``, or, for a node that names the class in
    ``_target_`` (model configs stored in checkpoints before encoders were built by name), the name that class is
    registered under. None when neither is known."""
    if not node:
        return None
    if node.get("name"):
        return str(node["name"])
    target = str(node.get("_target_") or "")
    class_name = target.rsplit(".", 1)[-1]
    for name in ENCODERS.names():
        if getattr(ENCODERS.get(name), "__name__", None) == class_name:
            return name
    return None


__all__ = [
    "ENCODERS",
    "ENCODER_TARGET",
    "LiteM2FEncoder",
    "M2FEncoder",
    "MultiScaleEncoder",
    "ProScaleEncoder",
    "RTM2FEncoder",
    "TokenRecalibration",
    "build_encoder",
    "encoder_name",
]
