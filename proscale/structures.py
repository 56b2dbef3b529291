"""Data that crosses package boundaries: dataset metadata and the documented batch / output formats.

Batch (what every datamodule's ``collate`` returns and the LightningModule consumes)::

    batch = {
        "images":      FloatTensor (B, 3, H, W)  normalized (RGB, 0-255 mean/std below), zero-padded to a
                                                  multiple of 32 (H, W = the padded size of the batch),
        "image_sizes": list[(h, w)]               valid (un-padded) region of each image in ``images``,
        "orig_sizes":  list[(h0, w0)]             size of each image as read from disk (inference output size),
        "image_ids":   list[int],
        "file_names":  list[str],
        "targets":     list[dict]  training targets at the padded size (see below),
        "gt":          list[dict]  (val/test only) ground truth at the original size (see below),
    }

Training target (one per image, ``masks`` at the padded (H, W) of ``images``, zero outside the image)::

    {"labels": LongTensor (N,) contiguous class ids in [0, K), "masks": BoolTensor (N, H, W)}

Evaluation ground truth (one per image, original size)::

    {"panoptic": LongTensor (h0, w0) segment id per pixel (0 = void/unlabeled),
     "segments": list[{"id": int, "category": int (contiguous), "iscrowd": 0|1, "area": int}],
     "sem_seg":  LongTensor (h0, w0) contiguous class per pixel, ``meta.ignore_label`` for void}

Model output (``Mask2Former.forward``)::

    {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs": [9 dicts of the two above]}

Inference output (one dict per image, ``proscale.models.inference``; every tensor at the original size)::

    {"sem_seg":   FloatTensor (K, h0, w0) per-class scores,
     "panoptic_seg": (LongTensor (h0, w0) segment ids, 0 = void,
                      list[{"id", "category_id" (contiguous), "isthing", "score", "area"}]),
     "instances": {"masks": BoolTensor (N, h0, w0), "scores": (N,), "labels": LongTensor (N,) contiguous}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISIBILITY = 32


@dataclass
class DatasetMeta:
    """Class metadata of a dataset; contiguous class index i <-> dataset category id ``category_ids[i]``."""

    class_names: list[str]
    category_ids: list[int]
    isthing: list[bool]
    ignore_label: int = 255
    colors: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.class_names) == len(self.category_ids) == len(self.isthing)):
            raise ValueError(
                "DatasetMeta: class_names, category_ids and isthing must have the same length, got "
                f"{len(self.class_names)}, {len(self.category_ids)}, {len(self.isthing)}"
            )
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"DatasetMeta: duplicate category ids in {self.category_ids}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def thing_classes(self) -> list[int]:
        return [i for i, t in enumerate(self.isthing) if t]

    def contiguous_id(self, category_id: int) -> int:
        """Dataset category id -> contiguous index; a clear error for an unknown id."""
        try:
            return self.category_ids.index(category_id)
        except ValueError:
            raise ValueError(f"unknown category id {category_id}; known ids: {self.category_ids}") from None
