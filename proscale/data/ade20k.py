"""ADE20K SceneParsing (150 classes) semantic segmentation: images + single-channel label PNGs.

Standard convention (detectron2's ``prepare_ade20k_sem_seg.py``): the raw PNG stores 0 for "other"
(unlabelled) and 1..150 for the classes; the contiguous class is ``value - 1`` and 0 becomes the ignore
label 255. ``shift_labels=True`` applies that to the raw ``annotations/`` folder; ``shift_labels=False``
reads already converted maps (``annotations_detectron2/``: 0..149 and 255). Any other value raises a
``ValueError`` naming the file: a wrong label is never passed on silently.

Training targets are one mask per class present (MaskFormer's semantic recipe). Evaluation ground truth
(original size) is the semantic map, plus a panoptic view of it (one segment per class, id = class + 1)
so the batch format is the same as for panoptic datasets.

The ADE20K *panoptic* conversion is read by :class:`~proscale.data.coco_panoptic.CocoPanopticDataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from proscale.data.categories import builtin_meta
from proscale.data.coco_panoptic import PanopticDataModule
from proscale.data.common import check_size, make_item, semantic_targets
from proscale.data.datamodule import SegmentationDataModule, crop_recipe
from proscale.data.image_io import read_label_png, read_rgb_image
from proscale.data.issues import IssueLog
from proscale.data.transforms import ResizeShortestEdge, Sample
from proscale.data.validation import VALIDATION_HINT, Problems, check_file, decode_all, header_size
from proscale.structures import DatasetMeta

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def semantic_ground_truth(sem_seg: np.ndarray, ignore_label: int) -> dict[str, Any]:
    """Semantic map -> gt dict with ``sem_seg`` and a one-segment-per-class panoptic view."""
    panoptic = np.where(sem_seg == ignore_label, 0, sem_seg + 1)
    classes, counts = np.unique(sem_seg[sem_seg != ignore_label], return_counts=True)
    segments = [{"id": int(c) + 1, "category": int(c), "iscrowd": 0, "area": int(n)} for c, n in zip(classes, counts)]
    return {"panoptic": torch.from_numpy(panoptic), "segments": segments, "sem_seg": torch.from_numpy(sem_seg)}


class SemanticSegDataset(Dataset):
    """Images in ``image_dir`` paired by file stem with label PNGs in ``label_dir``.

    Args:
        meta: class metadata (``meta.num_classes`` bounds the valid labels).
        shift_labels: raw ADE20K values (0 = ignore, 1..K) -> (255, 0..K-1).
        transform, with_gt: as for the other datasets.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        meta: DatasetMeta,
        transform: Callable[[Sample], Sample] | None = None,
        with_gt: bool = False,
        shift_labels: bool = True,
    ) -> None:
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.meta, self.transform, self.with_gt, self.shift_labels = meta, transform, with_gt, shift_labels
        self.issues = IssueLog(str(self.label_dir))
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise ValueError(f"{folder}: folder is missing")
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise ValueError(f"{self.image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    def __len__(self) -> int:
        return len(self.images)

    def check_files(self, verify_images: bool = False) -> None:
        """Every image has its label PNG, of the same header size; ``verify_images`` also decodes both (and checks
        the label values). Raises :class:`DataValidationError` listing the problems."""
        problems = Problems(self.label_dir)
        for image_path in self.images:
            try:
                size = header_size(image_path)
            except ValueError as error:
                problems.add(str(error))
                size = None
            check_file(
                self.label_dir / f"{image_path.stem}.png", "label PNG", problems, size, f"its image {image_path.name}"
            )
        if verify_images:
            readers = [(path, read_rgb_image) for path in self.images]
            readers += [(self.label_dir / f"{path.stem}.png", self.read_labels) for path in self.images]
            decode_all(readers, problems)
        problems.raise_if_any(VALIDATION_HINT)

    def read_labels(self, path: Path) -> np.ndarray:
        """Label PNG -> contiguous classes with ``meta.ignore_label``; raises on out-of-range values."""
        raw = read_label_png(path)
        ignore, num_classes = self.meta.ignore_label, self.meta.num_classes
        if self.shift_labels:
            bad = raw > num_classes
            labels = np.where(raw == 0, ignore, raw - 1)
        else:
            bad = (raw >= num_classes) & (raw != ignore)
            labels = raw
        if bad.any():
            values = sorted(set(raw[bad].tolist()))[:10]
            raise ValueError(
                f"{path}: label values {values} outside the {num_classes} classes "
                f"({'1..' + str(num_classes) + ' and 0 = ignore' if self.shift_labels else '0..' + str(num_classes - 1) + f' and {ignore}'})"
            )
        return labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path = self.images[index]
        label_path = self.label_dir / f"{image_path.stem}.png"
        image = read_rgb_image(image_path)
        sem_seg = self.read_labels(label_path)
        check_size(label_path, sem_seg.shape, image.shape[:2], f"its image {image_path.name}")
        if (sem_seg == self.meta.ignore_label).all():
            self.issues.report("image without annotations (all ignore)", str(label_path))
        gt = semantic_ground_truth(sem_seg, self.meta.ignore_label) if self.with_gt else None
        sample = Sample(image=image, maps={"sem_seg": sem_seg}, fills={"sem_seg": self.meta.ignore_label})
        if self.transform is not None:
            sample = self.transform(sample)
        labels, masks = semantic_targets(sample.maps["sem_seg"], self.meta.ignore_label)
        return make_item(
            sample, labels, masks, image_id=index, file_name=image_path.name, orig_size=image.shape[:2], gt=gt
        )


ADE20K_LAYOUT = """\
<root>/                               e.g. data/ADEChallengeData2016
  images/training/*.jpg  images/validation/*.jpg
  annotations/training/*.png  annotations/validation/*.png      raw labels: 0 = other (ignored), 1..150
  annotations_detectron2/{training,validation}/*.png            optional, already shifted (0..149, 255)
  ade20k_panoptic_{train,val}.json  ade20k_panoptic_{train,val}/*.png   panoptic conversion (data=ade20k_panoptic)"""


class ADE20KSemanticDataModule(SegmentationDataModule):
    """ADE20K-150 semantic segmentation (mIoU), split folders ``training`` / ``validation``.

    Args:
        label_dir: ``"annotations"`` (raw, ``shift_labels=True``) or ``"annotations_detectron2"``
            (converted, ``shift_labels=False``).
    """

    name = "ADE20K"
    layout = ADE20K_LAYOUT
    eval_tasks = ("semantic",)

    def default_train_transforms(self) -> list:
        return crop_recipe(512, 512, 2048)

    def default_test_transforms(self) -> list:
        return [ResizeShortestEdge(512, 2048)]

    def __init__(
        self,
        root: str | Path = "data/ADEChallengeData2016",
        meta: DatasetMeta | str = "ade20k",
        label_dir: str = "annotations",
        shift_labels: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_split", "training")
        kwargs.setdefault("val_split", "validation")
        self.label_dir, self.shift_labels = label_dir, shift_labels
        super().__init__(root=root, meta=builtin_meta(meta) if isinstance(meta, str) else meta, **kwargs)

    def split_paths(self, split: str) -> dict[str, Path]:
        return {"image_dir": self.root / "images" / split, "label_dir": self.root / self.label_dir / split}

    def build_dataset(self, split: str, train: bool) -> Dataset:
        paths = self.split_paths(split)
        return SemanticSegDataset(
            paths["image_dir"],
            paths["label_dir"],
            self.meta,
            transform=self.train_transform if train else self.test_transform,
            with_gt=not train,
            shift_labels=self.shift_labels,
        )


class ADE20KPanopticDataModule(PanopticDataModule):
    """ADE20K panoptic conversion (Mask2Former's ``prepare_ade20k_pan_seg.py``): 150 classes, 100 things."""

    name = "ADE20K panoptic"
    layout = ADE20K_LAYOUT
    default_train_transforms = ADE20KSemanticDataModule.default_train_transforms
    default_test_transforms = ADE20KSemanticDataModule.default_test_transforms

    def __init__(
        self, root: str | Path = "data/ADEChallengeData2016", meta: DatasetMeta | str = "ade20k", **kwargs: Any
    ) -> None:
        kwargs.setdefault("train_split", "train")
        kwargs.setdefault("val_split", "val")
        self.image_split_names = {"train": "training", "val": "validation"}
        super().__init__(
            root=root,
            meta=meta,
            image_dir="images/{split}",
            panoptic_dir="ade20k_panoptic_{split}",
            panoptic_json="ade20k_panoptic_{split}.json",
            instance_json="ade20k_instance_{split}.json",
            **kwargs,
        )

    def split_paths(self, split: str) -> dict[str, Path]:
        paths = super().split_paths(split)
        paths["image_dir"] = self.root / "images" / self.image_split_names.get(split, split)
        return paths
