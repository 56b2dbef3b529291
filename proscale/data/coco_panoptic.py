"""COCO-format panoptic dataset: images + RGB-encoded panoptic PNGs + a JSON with ``segments_info``.

The same reader serves COCO panoptic, the ADE20K and Cityscapes panoptic conversions and the generated
synthetic dataset. Handling follows the original Mask2Former:

- training targets: one binary mask + contiguous class per non-crowd segment (crowd segments are not
  targets; their pixels, like void pixels with id 0, belong to no target mask);
- evaluation ground truth at the original size: the id map (0 = void), the segments (crowd kept with
  ``iscrowd=1`` so PQ can exclude them) and a semantic map where every segment (crowd included, as in
  Mask2Former's semantic conversion) paints its class and void is ``ignore_label``.

Problems in the data are either fatal with a ``ValueError`` naming the file (missing/corrupt image or PNG,
size mismatch, unknown category id, duplicate image or segment ids; the JSON's are collected and raised together
when the split is indexed, the files' at setup by ``check_files``, see :mod:`proscale.data.validation`) or
handled, counted and logged once in
``self.issues`` (segments with zero area, JSON segments absent from the PNG, PNG ids absent from the JSON,
images without annotations): handled cases become void, never a wrong label.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from proscale.data.categories import meta_from_categories
from proscale.data.common import ANNOTATION_JSON, check_size, make_item, resolve_meta
from proscale.data.datamodule import SegmentationDataModule, coco_test_recipe, lsj_recipe
from proscale.data.image_io import read_panoptic_png, read_rgb_image
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


def image_path_same_name(image_dir: Path, image: dict, annotation: dict | None) -> Path:
    """COCO / synthetic / ADE20K: the image file is ``image_dir / images[i]["file_name"]``."""
    return image_dir / image["file_name"]


def image_path_cityscapes(image_dir: Path, image: dict, annotation: dict | None) -> Path:
    """Cityscapes: ``leftImg8bit/<split>/<city>/<image id>_leftImg8bit.png`` (city = id up to the first '_')."""
    image_id = str(image["id"])
    return image_dir / image_id.split("_")[0] / f"{image_id}_leftImg8bit.png"


IMAGE_PATH_RULES: dict[str, Callable[[Path, dict, dict | None], Path]] = {
    "file_name": image_path_same_name,
    "cityscapes": image_path_cityscapes,
}


class CocoPanopticDataset(Dataset):
    """One split of a COCO-format panoptic dataset.

    Args:
        image_dir: folder of the images.
        panoptic_dir: folder of the panoptic PNGs (``annotations[i]["file_name"]``).
        panoptic_json: the panoptic JSON (``images``, ``annotations`` with ``segments_info``, ``categories``).
        meta: class metadata; ``None`` reads it from the JSON's ``categories``.
        transform: callable on :class:`~proscale.data.transforms.Sample` (map ``"panoptic"``).
        with_gt: add the evaluation ground truth (``item["gt"]``) at the original size.
        image_path_rule: ``"file_name"`` (default) or ``"cityscapes"``.
        cache_decoded: keep every decoded image + id map in memory after its first read (for small datasets
            such as the generated one: decoding is ~half of the loading time; each worker holds its own copy).
    """

    def __init__(
        self,
        image_dir: str | Path,
        panoptic_dir: str | Path,
        panoptic_json: str | Path,
        meta: DatasetMeta | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        with_gt: bool = False,
        image_path_rule: str = "file_name",
        cache_decoded: bool = False,
    ) -> None:
        self.image_dir, self.panoptic_dir, self.json_path = Path(image_dir), Path(panoptic_dir), Path(panoptic_json)
        if image_path_rule not in IMAGE_PATH_RULES:
            raise ValueError(f"unknown image_path_rule {image_path_rule!r}; valid choices: {sorted(IMAGE_PATH_RULES)}")
        self.image_path = IMAGE_PATH_RULES[image_path_rule]
        self.transform, self.with_gt = transform, with_gt
        self.issues = IssueLog(str(self.json_path))
        data = require_json_object(
            read_json(self.json_path, ANNOTATION_JSON), self.json_path, ("images", "annotations")
        )
        self.meta = meta if meta is not None else meta_from_categories(data.get("categories", []), str(self.json_path))
        self._category_to_contiguous = {cid: i for i, cid in enumerate(self.meta.category_ids)}
        self.records = self._build_records(data)
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray, list[dict[str, int]]]] | None = (
            {} if cache_decoded else None
        )

    def _build_records(self, data: dict) -> list[dict[str, Any]]:
        """One record per image; every problem in the JSON is collected and raised together (DataValidationError)."""
        problems = Problems(self.json_path)
        fields = ("id", "file_name") if self.image_path is image_path_same_name else ("id",)
        check_image_entries(data["images"], self.json_path, problems, fields)
        annotations = self._index_annotations(data, problems)
        problems.raise_if_any()  # the structure must hold before the records can be built
        records = []
        for index, image in enumerate(data["images"]):
            annotation = annotations.get(image["id"])
            image_path = self.image_path(self.image_dir, image, annotation)
            if annotation is None:
                self.issues.report("image without annotation entry (all void)", str(image_path))
                segments = []
            else:
                segments = self._check_segments(annotation, image_path, problems)
                if not segments:
                    self.issues.report("image with no segments (all void)", str(image_path))
            records.append(
                {
                    "image_id": image["id"] if isinstance(image["id"], int) else index,
                    "image_path": image_path,
                    "panoptic_path": self.panoptic_dir / annotation["file_name"] if annotation else None,
                    "size": (image["height"], image["width"]) if "height" in image and "width" in image else None,
                    "segments": segments,
                }
            )
        problems.raise_if_any()
        return records

    def _index_annotations(self, data: dict, problems: Problems) -> dict[Any, dict]:
        """``image_id -> annotation``; two annotations for one image, one for an image not in ``images``, or two
        images sharing a PNG are problems (the index would silently keep one of them)."""
        image_ids = {image.get("id") for image in data["images"] if isinstance(image, dict)}
        annotations: dict[Any, dict] = {}
        for index, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or "file_name" not in ann:
                problems.add(f"{self.json_path}: annotations[{index}] needs image_id and file_name: {str(ann)[:120]}")
                continue
            if ann["image_id"] not in image_ids:
                problems.add(
                    f"{self.json_path}: annotation {ann['file_name']} refers to unknown image id {ann['image_id']!r}"
                )
            elif ann["image_id"] in annotations:
                problems.add(f"{self.json_path}: image id {ann['image_id']!r} has more than one annotation entry")
            annotations[ann["image_id"]] = ann
        for png in duplicates(ann["file_name"] for ann in annotations.values()):
            problems.add(f"{self.json_path}: panoptic PNG {png} is the annotation of more than one image")
        return annotations

    def _check_segments(self, annotation: dict, image_path: Path, problems: Problems) -> list[dict[str, int]]:
        """JSON segments -> [{id, category (contiguous), iscrowd}]; unknown categories and duplicate or zero
        segment ids are added to ``problems``."""
        segments, seen = [], set()
        for seg in annotation.get("segments_info", []):
            try:
                seg_id, category_id = int(seg["id"]), int(seg["category_id"])
            except (KeyError, TypeError, ValueError):
                problems.add(f"{self.json_path}: image {image_path.name}: malformed segment {str(seg)[:120]}")
                continue
            if category_id not in self._category_to_contiguous:
                problems.add(
                    f"{self.json_path}: image {image_path.name}: segment {seg_id} has unknown category id "
                    f"{category_id}; known ids: {self.meta.category_ids}"
                )
                continue
            if seg_id == 0 or seg_id in seen:
                problems.add(
                    f"{self.json_path}: image {image_path.name}: segment id {seg_id} is "
                    + ("0 (reserved for void)" if seg_id == 0 else "used twice")
                )
                continue
            seen.add(seg_id)
            if "area" in seg and int(seg["area"]) == 0:
                self.issues.report("zero-area segment dropped", f"{image_path.name} segment {seg_id}")
                continue
            segments.append(
                {
                    "id": seg_id,
                    "category": self._category_to_contiguous[category_id],
                    "iscrowd": int(seg.get("iscrowd", 0)),
                }
            )
        return segments

    @property
    def num_annotated(self) -> int:
        """Images with at least one (kept) segment."""
        return sum(1 for record in self.records if record["segments"])

    def check_files(self, verify_images: bool = False) -> None:
        """Every image and panoptic PNG exists, with header sizes matching the JSON and each other; with
        ``verify_images`` every file is also decoded. Raises :class:`DataValidationError` listing the problems."""
        problems = Problems(self.json_path)
        for record in self.records:
            image_size = check_file(
                record["image_path"], "image", problems, record["size"], f"the size in {self.json_path.name}"
            )
            if record["panoptic_path"] is not None:
                expected = image_size or record["size"]  # an image of the wrong size is already reported
                name = record["image_path"].name
                check_file(record["panoptic_path"], "panoptic PNG", problems, expected, f"its image {name}")
        if verify_images:
            readers = [(r["image_path"], read_rgb_image) for r in self.records]
            readers += [(r["panoptic_path"], read_panoptic_png) for r in self.records if r["panoptic_path"]]
            decode_all(readers, problems)
        problems.raise_if_any(VALIDATION_HINT)

    def __len__(self) -> int:
        return len(self.records)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, int]]]:
        """Image (H, W, 3) uint8, id map (H, W) int64 with unknown ids set to 0, and the segments in the PNG."""
        if self._decoded is None:
            return self._decode(index)
        if index not in self._decoded:
            image, ids, segments = self._decode(index)
            # ids are < 256^3 (RGB-encoded): int32 halves the cache; astype below copies back to int64
            self._decoded[index] = (image, ids.astype(np.int32), segments)
        image, ids, segments = self._decoded[index]
        return image.copy(), ids.astype(np.int64), list(segments)  # transforms may write into what they are given

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, int]]]:
        record = self.records[index]
        image = read_rgb_image(record["image_path"])
        size = image.shape[:2]
        if record["size"] is not None:
            check_size(record["image_path"], size, record["size"], f"the size in {self.json_path.name}")
        if record["panoptic_path"] is None:
            return image, np.zeros(size, dtype=np.int64), []
        ids = read_panoptic_png(record["panoptic_path"])
        check_size(record["panoptic_path"], ids.shape, size, f"its image {record['image_path'].name}")
        present = set(np.unique(ids).tolist()) - {0}
        segments = []
        for seg in record["segments"]:
            if seg["id"] in present:
                segments.append(seg)
            else:
                self.issues.report(
                    "JSON segment absent from the PNG dropped", f"{record['panoptic_path']} id {seg['id']}"
                )
        unknown = present - {seg["id"] for seg in record["segments"]}
        if unknown:
            self.issues.report(
                "PNG segment ids without a JSON entry set to void", f"{record['panoptic_path']} ids {sorted(unknown)}"
            )
            ids = np.where(np.isin(ids, list(unknown)), 0, ids)
        return image, ids, segments

    def ground_truth(self, ids: np.ndarray, segments: list[dict[str, int]]) -> dict[str, Any]:
        """Evaluation ground truth at the original size (see :mod:`proscale.structures`)."""
        sem_seg = np.full(ids.shape, self.meta.ignore_label, dtype=np.int64)
        out_segments = []
        for seg in segments:
            mask = ids == seg["id"]
            sem_seg[mask] = seg["category"]
            out_segments.append({**seg, "area": int(mask.sum())})
        return {"panoptic": torch.from_numpy(ids), "segments": out_segments, "sem_seg": torch.from_numpy(sem_seg)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, ids, segments = self.load_raw(index)
        gt = self.ground_truth(ids, segments) if self.with_gt else None
        sample = Sample(image=image, maps={"panoptic": ids}, fills={"panoptic": 0})
        if self.transform is not None:
            sample = self.transform(sample)
        labels, masks = [], []
        for seg in segments:
            if seg["iscrowd"]:
                continue
            mask = sample.maps["panoptic"] == seg["id"]
            if mask.any():  # a segment cropped away is no target
                labels.append(seg["category"])
                masks.append(mask)
        return make_item(
            sample,
            labels,
            masks,
            image_id=record["image_id"],
            file_name=record["image_path"].name,
            orig_size=image.shape[:2],
            gt=gt,
        )


COCO_PANOPTIC_LAYOUT = """\
<root>/                               e.g. data/coco
  train2017/  val2017/                images (*.jpg) named in the JSON
  panoptic_train2017/  panoptic_val2017/   panoptic PNGs (ids = R + 256 G + 256^2 B)
  annotations/
    panoptic_train2017.json  panoptic_val2017.json   (images, annotations[segments_info], categories)
    instances_train2017.json instances_val2017.json  (optional, for instance AP against the official file)"""


class PanopticDataModule(SegmentationDataModule):
    """COCO-format panoptic data; subclasses (or the arguments) choose the folder names.

    Args:
        image_dir / panoptic_dir / panoptic_json / instance_json: path templates under ``root``, with
            ``{split}`` replaced by the split name.
        meta: a :class:`DatasetMeta`, a built-in name (``coco_panoptic``, ``ade20k``, ``cityscapes``) or
            ``"json"`` (read the train split's ``categories``).
        image_path_rule: ``"file_name"`` or ``"cityscapes"``.
        cache_decoded: keep decoded images + id maps in memory (:class:`CocoPanopticDataset`).
        **kwargs: :class:`SegmentationDataModule` arguments.
    """

    name = "COCO-format panoptic"
    layout = COCO_PANOPTIC_LAYOUT

    def __init__(
        self,
        root: str | Path,
        meta: DatasetMeta | str = "json",
        image_dir: str = "{split}",
        panoptic_dir: str = "panoptic_{split}",
        panoptic_json: str = "annotations/panoptic_{split}.json",
        instance_json: str | None = "annotations/instances_{split}.json",
        image_path_rule: str = "file_name",
        cache_decoded: bool = False,
        **kwargs: Any,
    ) -> None:
        self.cache_decoded = cache_decoded
        self.templates = {"image_dir": image_dir, "panoptic_dir": panoptic_dir, "panoptic_json": panoptic_json}
        self.instance_json_template = instance_json
        self.image_path_rule = image_path_rule
        root = Path(root)
        json_path = root / panoptic_json.format(split=kwargs.get("train_split", "train"))
        meta = resolve_meta(meta, json_path, "panoptic JSON", self.name, self.layout)
        super().__init__(root=root, meta=meta, **kwargs)

    def split_paths(self, split: str) -> dict[str, Path]:
        return {what: self.root / template.format(split=split) for what, template in self.templates.items()}

    def gt_files(self, split: str = "val") -> dict[str, Path]:
        files = super().gt_files(split)
        if self.instance_json_template:
            instance_json = self.root / self.instance_json_template.format(split=self.splits.get(split, split))
            if instance_json.is_file():
                files["instance_json"] = instance_json
        return files

    def build_dataset(self, split: str, train: bool) -> Dataset:
        paths = self.split_paths(split)
        return CocoPanopticDataset(
            paths["image_dir"],
            paths["panoptic_dir"],
            paths["panoptic_json"],
            meta=self.meta,
            transform=self.train_transform if train else self.test_transform,
            with_gt=not train,
            image_path_rule=self.image_path_rule,
            cache_decoded=self.cache_decoded,
        )


class CocoPanopticDataModule(PanopticDataModule):
    """COCO panoptic 2017 (133 classes) in its standard layout (see ``COCO_PANOPTIC_LAYOUT``)."""

    name = "COCO panoptic"

    def default_train_transforms(self) -> list:
        return lsj_recipe()

    def default_test_transforms(self) -> list:
        return coco_test_recipe()

    def __init__(
        self, root: str | Path = "data/coco", meta: DatasetMeta | str = "coco_panoptic", **kwargs: Any
    ) -> None:
        kwargs.setdefault("train_split", "train2017")
        kwargs.setdefault("val_split", "val2017")
        super().__init__(root=root, meta=meta, **kwargs)
