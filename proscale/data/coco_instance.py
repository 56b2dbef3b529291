"""COCO instance segmentation dataset read with pycocotools (polygons, uncompressed and compressed RLE).

Training targets are the non-crowd instances (binary mask + contiguous class); crowd regions are not
targets (Mask2Former's instance mapper drops ``iscrowd=1``). Instances may overlap, so the masks travel
through the augmentations as one (N, H, W) stack. With ``with_gt`` the item carries, at the original size::

    gt = {"instances": {"masks": BoolTensor (N, h0, w0), "labels": LongTensor (N,) contiguous,
                        "iscrowd": LongTensor (N,), "ann_ids": list[int]}}

(all annotations, crowd included, for COCOeval-style scoring; the official JSON is also available from
the datamodule's ``gt_files``). Errors name the file: unknown category id, an RLE whose size disagrees
with the image, a missing/corrupt image. Handled and counted (``self.issues``): zero-area annotations and
degenerate polygons (fewer than 3 points) are dropped; images without usable annotations are skipped in
training (as detectron2 does) and kept, empty, for evaluation.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from proscale.data.categories import meta_from_categories
from proscale.data.common import ANNOTATION_JSON, check_size, make_item, resolve_meta
from proscale.data.datamodule import SegmentationDataModule, coco_test_recipe, lsj_recipe
from proscale.data.image_io import read_rgb_image
from proscale.data.issues import IssueLog
from proscale.data.transforms import Sample
from proscale.data.validation import (
    VALIDATION_HINT,
    Problems,
    check_file,
    check_image_entries,
    decode_all,
    duplicates,
    require_json_object,
)
from proscale.structures import DatasetMeta
from proscale.utils.io import read_json


class CocoInstanceDataset(Dataset):
    """One split of a COCO instance-segmentation dataset.

    Args:
        image_dir: folder of the images (``images[i]["file_name"]``).
        instance_json: the ``instances_*.json``.
        meta: class metadata; ``None`` reads it from the JSON's ``categories``.
        transform: callable on :class:`~proscale.data.transforms.Sample` (map ``"instances"``).
        with_gt: add the evaluation ground truth at the original size.
        skip_empty: drop images without any non-crowd annotation (training).
    """

    def __init__(
        self,
        image_dir: str | Path,
        instance_json: str | Path,
        meta: DatasetMeta | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        with_gt: bool = False,
        skip_empty: bool = False,
    ) -> None:
        self.image_dir, self.json_path = Path(image_dir), Path(instance_json)
        self.transform, self.with_gt = transform, with_gt
        self.issues = IssueLog(str(self.json_path))
        data = require_json_object(read_json(self.json_path, ANNOTATION_JSON), self.json_path, ("images",))
        self.meta = meta if meta is not None else meta_from_categories(data.get("categories", []), str(self.json_path))
        self._category_to_contiguous = {cid: i for i, cid in enumerate(self.meta.category_ids)}
        problems = Problems(self.json_path)
        self._check_structure(data, problems)
        problems.raise_if_any()  # pycocotools' index would silently keep one of two entries sharing an id
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self.records = self._build_records(skip_empty, problems)
        problems.raise_if_any()

    def _check_structure(self, data: dict, problems: Problems) -> None:
        """Image entries complete with unique ids; annotations are objects with unique ids naming a known image."""
        check_image_entries(data["images"], self.json_path, problems, ("id", "file_name", "height", "width"))
        annotations = data.setdefault("annotations", [])
        if not isinstance(annotations, list):
            problems.add(f"{self.json_path}: 'annotations' must be a list")
            return
        image_ids = {image.get("id") for image in data["images"] if isinstance(image, dict)}
        for index, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
                problems.add(f"{self.json_path}: annotations[{index}] needs image_id and category_id: {str(ann)[:120]}")
            elif ann["image_id"] not in image_ids:
                problems.add(
                    f"{self.json_path}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']!r}"
                )
        for ann_id in duplicates(ann.get("id") for ann in annotations if isinstance(ann, dict) and "id" in ann):
            problems.add(f"{self.json_path}: annotation id {ann_id!r} is used more than once")

    def _build_records(self, skip_empty: bool, problems: Problems) -> list[dict[str, Any]]:
        records = []
        self.num_annotated = 0
        for image_id in sorted(self.coco.imgs):
            image = self.coco.imgs[image_id]
            annotations = []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if int(ann["category_id"]) not in self._category_to_contiguous:
                    problems.add(
                        f"{self.json_path}: annotation {ann.get('id')} (image {image['file_name']}) has unknown "
                        f"category id {ann['category_id']}; known ids: {self.meta.category_ids}"
                    )
                    continue
                segm = ann.get("segmentation")
                if isinstance(segm, list):
                    polygons = [p for p in segm if len(p) >= 6]
                    if len(polygons) < len(segm):
                        self.issues.report("degenerate polygon (< 3 points) dropped", f"annotation {ann.get('id')}")
                    if not polygons:
                        continue
                    ann = {**ann, "segmentation": polygons}
                elif not isinstance(segm, dict):
                    problems.add(f"{self.json_path}: annotation {ann.get('id')} has no valid 'segmentation'")
                    continue
                if float(ann.get("area", 1)) <= 0:
                    self.issues.report("zero-area annotation dropped", f"annotation {ann.get('id')}")
                    continue
                annotations.append(ann)
            if not any(not a.get("iscrowd", 0) for a in annotations):
                self.issues.report("image without annotations", image["file_name"])
                if skip_empty:
                    continue
            else:
                self.num_annotated += 1
            records.append({"image": image, "annotations": annotations})
        return records

    def check_files(self, verify_images: bool = False) -> None:
        """Every image exists with the header size the JSON gives (and RLE sizes agree); ``verify_images`` also
        decodes each image. Raises :class:`DataValidationError` listing the problems."""
        problems = Problems(self.json_path)
        for record in self.records:
            info = record["image"]
            size = (info["height"], info["width"])
            check_file(
                self.image_dir / info["file_name"], "image", problems, size, f"the size in {self.json_path.name}"
            )
            for ann in record["annotations"]:
                segm = ann["segmentation"]
                if isinstance(segm, dict) and "size" in segm and tuple(segm["size"]) != size:
                    problems.add(
                        f"{self.json_path}: annotation {ann.get('id')} RLE size {segm['size']} does not match image "
                        f"{info['file_name']} of size {list(size)}"
                    )
        if verify_images:
            decode_all([(self.image_dir / r["image"]["file_name"], read_rgb_image) for r in self.records], problems)
        problems.raise_if_any(VALIDATION_HINT)

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, ann: dict, size: tuple[int, int], image_name: str) -> np.ndarray:
        segm = ann["segmentation"]
        if isinstance(segm, dict) and "size" in segm and tuple(segm["size"]) != size:
            raise ValueError(
                f"{self.json_path}: annotation {ann.get('id')} RLE size {segm['size']} does not match image "
                f"{image_name} of size {list(size)}"
            )
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, size[0], size[1]))
        elif isinstance(segm.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segm, size[0], size[1])
        else:
            rle = segm
        return mask_utils.decode(rle).astype(bool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        info = record["image"]
        path = self.image_dir / info["file_name"]
        image = read_rgb_image(path)
        size = image.shape[:2]
        check_size(path, size, (info["height"], info["width"]), f"the size in {self.json_path.name}")
        masks = np.zeros((len(record["annotations"]), *size), dtype=bool)
        for k, ann in enumerate(record["annotations"]):
            masks[k] = self._decode(ann, size, info["file_name"])
        labels = [self._category_to_contiguous[int(a["category_id"])] for a in record["annotations"]]
        crowd = [int(a.get("iscrowd", 0)) for a in record["annotations"]]
        empty = [k for k in range(len(masks)) if not masks[k].any()]
        for k in empty:
            self.issues.report(
                "annotation with an empty decoded mask dropped", f"annotation {record['annotations'][k].get('id')}"
            )
        gt = None
        if self.with_gt:
            keep = [k for k in range(len(masks)) if masks[k].any()]
            gt = {
                "instances": {
                    "masks": torch.from_numpy(masks[keep]),
                    "labels": torch.tensor([labels[k] for k in keep], dtype=torch.long),
                    "iscrowd": torch.tensor([crowd[k] for k in keep], dtype=torch.long),
                    "ann_ids": [record["annotations"][k].get("id") for k in keep],
                }
            }
        train_index = [k for k in range(len(masks)) if not crowd[k]]
        sample = Sample(image=image, maps={"instances": masks[train_index]}, fills={"instances": 0})
        if self.transform is not None:
            sample = self.transform(sample)
        out_labels, out_masks = [], []
        for k, mask in zip(train_index, sample.maps["instances"]):
            if mask.any():
                out_labels.append(labels[k])
                out_masks.append(mask)
        return make_item(
            sample, out_labels, out_masks, image_id=info["id"], file_name=info["file_name"], orig_size=size, gt=gt
        )


COCO_INSTANCE_LAYOUT = """\
<root>/                               e.g. data/coco
  train2017/  val2017/                images (*.jpg) named in the JSON
  annotations/
    instances_train2017.json  instances_val2017.json   (polygons or RLE, iscrowd)"""


class CocoInstanceDataModule(SegmentationDataModule):
    """COCO instance segmentation (80 classes by default; ``meta="json"`` reads the JSON's categories).

    Args:
        image_dir / instance_json: path templates under ``root`` (``{split}`` = split name).
    """

    name = "COCO instance"
    layout = COCO_INSTANCE_LAYOUT
    eval_tasks = ("instance",)

    def default_train_transforms(self) -> list:
        return lsj_recipe()

    def default_test_transforms(self) -> list:
        return coco_test_recipe()

    def __init__(
        self,
        root: str | Path = "data/coco",
        meta: DatasetMeta | str = "coco_instance",
        image_dir: str = "{split}",
        instance_json: str = "annotations/instances_{split}.json",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_split", "train2017")
        kwargs.setdefault("val_split", "val2017")
        self.templates = {"image_dir": image_dir, "instance_json": instance_json}
        root = Path(root)
        json_path = root / instance_json.format(split=kwargs["train_split"])
        meta = resolve_meta(meta, json_path, "instance JSON", self.name, self.layout)
        super().__init__(root=root, meta=meta, **kwargs)

    def split_paths(self, split: str) -> dict[str, Path]:
        return {what: self.root / template.format(split=split) for what, template in self.templates.items()}

    def build_dataset(self, split: str, train: bool) -> Dataset:
        paths = self.split_paths(split)
        return CocoInstanceDataset(
            paths["image_dir"],
            paths["instance_json"],
            meta=self.meta,
            transform=self.train_transform if train else self.test_transform,
            with_gt=not train,
            skip_empty=train,
        )
