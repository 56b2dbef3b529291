"""What a deployed file carries besides the graph, so that the file alone suffices for prediction.

Stored as string key/value pairs: ONNX ``metadata_props`` (read back by ONNX Runtime's
``custom_metadata_map``, no ``onnx`` package needed) and a JSON extra file inside ``torch.export`` archives.
Every value is JSON under a ``proscale.`` key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

PREFIX = "proscale."
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_masks")


@dataclass
class DeployMetadata:
    """Everything predict needs next to the exported network.

    image_size: (H, W) the graph was exported at (a multiple of 32); for a fixed-size export the only
        accepted input size.
    dynamic: whether H and W are free (multiples of 32 in the exported range).
    batch_size: the exported batch size (batches of other sizes are run in pieces by the runtime wrapper).
    num_classes: K (the logits have K+1 entries, "no object" last).
    meta: :class:`proscale.structures.DatasetMeta` fields (class names, ids, thing flags, colours) or None.
    inference: ``Mask2FormerInference`` keyword arguments other than num_classes / thing_classes, or None.
    test_transforms: the test-time transforms as Hydra configs (dicts with ``_target_``), or None.
    model_config: the model config the network was built from.
    exporter, opset: how the file was made (``torchscript`` / ``dynamo`` / ``torch.export``; opset or None).
    """

    image_size: tuple[int, int]
    dynamic: bool
    batch_size: int
    num_classes: int
    meta: dict | None = None
    inference: dict | None = None
    test_transforms: list | None = None
    model_config: dict | None = None
    exporter: str = ""
    opset: int | None = None
    format_version: int = FORMAT_VERSION

    def dataset_meta(self):
        """The stored class metadata as :class:`proscale.structures.DatasetMeta` (None if not stored)."""
        from proscale.structures import DatasetMeta

        return None if self.meta is None else DatasetMeta(**self.meta)

    def build_inference(self, **overrides: Any):
        """``Mask2FormerInference`` with the stored classes and settings; ``overrides`` win (e.g. tasks on/off)."""
        from proscale.models.inference import Mask2FormerInference

        meta = self.dataset_meta()
        thing_classes = meta.thing_classes if meta is not None else None
        return Mask2FormerInference(self.num_classes, thing_classes, **{**(self.inference or {}), **overrides})

    def to_props(self) -> dict[str, str]:
        return {PREFIX + key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model file") -> DeployMetadata:
        """Read the ``proscale.*`` entries back; ValueError naming ``source`` when they are missing or bad."""
        ours = {key[len(PREFIX) :]: value for key, value in props.items() if key.startswith(PREFIX)}
        required = ("image_size", "dynamic", "batch_size", "num_classes")
        missing = [key for key in required if key not in ours]
        if missing:
            raise ValueError(
                f"{source} carries no proscale metadata ({', '.join(PREFIX + k for k in missing)} missing): "
                "export it with scripts/export.py / proscale.export"
            )
        known = {f.name for f in fields(cls)}
        try:
            values: dict[str, Any] = {key: json.loads(value) for key, value in ours.items() if key in known}
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: unreadable proscale metadata ({error})") from None
        if values.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"{source} was written by a newer proscale (metadata version {values['format_version']} > "
                f"{FORMAT_VERSION}); update proscale"
            )
        values["image_size"] = tuple(int(v) for v in values["image_size"])
        return cls(**values)


__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "DeployMetadata"]
