"""The LightningDataModule shared by every dataset family (selected in Hydra by ``data=<family>``).

A family subclass only says where its files are (``split_paths``), how to read a split
(``build_dataset``) and what its folder tree looks like (``layout``, quoted in the error when files are
missing). Everything else is common:

- ``.meta`` (:class:`~proscale.structures.DatasetMeta`) exists right after construction, before any file
  is read, so the model can be built with ``meta.num_classes``;
- ``batch_size`` is per process (per GPU): the global batch is ``batch_size * world_size``;
- train batches are shuffled; under DDP Lightning inserts its ``DistributedSampler``. Validation/test
  loaders under DDP use Lightning's ``UnrepeatedDistributedSampler`` (each image on exactly one rank; no
  padding duplicates that would count an image twice in PQ/AP/mIoU), so ranks may see one batch more or
  less -- evaluators must gather at epoch end, not per step;
- ``collate_batch`` builds the batch dict of :mod:`proscale.structures`; val/test batches carry ``gt``;
- ``gt_files(split)`` names the official annotation files of a split for offline scoring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler

from proscale.data.collate import collate_batch
from proscale.data.common import require_paths
from proscale.data.resumable import ResumableDataLoader, SkippingBatchSampler
from proscale.data.transforms import (
    ColorAugSSD,
    Compose,
    FixedSizeCrop,
    RandomCrop,
    RandomFlip,
    ResizeScale,
    ResizeShortestEdge,
    scale_list,
)
from proscale.data.validation import DataValidationError
from proscale.structures import DatasetMeta

log = logging.getLogger("proscale.data")


def _source(dataset: Dataset) -> str:
    """`` (<annotation file>)`` for datasets read from one, else ``""``."""
    path = getattr(dataset, "json_path", None) or getattr(dataset, "label_dir", None)
    return f" ({path})" if path else ""


def lsj_recipe(size: int | tuple[int, int] = 1024, min_scale: float = 0.1, max_scale: float = 2.0) -> list:
    """COCO large-scale jitter: flip, scale 0.1-2.0 of ``size`` (an int or (H, W)), crop/pad to ``size``."""
    return [RandomFlip(), ResizeScale(min_scale, max_scale, size), FixedSizeCrop(size)]


def coco_test_recipe(short_edge: int = 800, max_size: int = 1333) -> list:
    return [ResizeShortestEdge(short_edge, max_size)]


def crop_recipe(base: int, crop_size: int | tuple[int, int], max_size: int) -> list:
    """ADE20K / Cityscapes: short side from 0.5..2.0 x ``base``, random crop, SSD colour distortion, flip."""
    return [ResizeShortestEdge(scale_list(base), max_size), RandomCrop(crop_size), ColorAugSSD(), RandomFlip()]


class SegmentationDataModule(LightningDataModule):
    """Common datamodule; subclasses implement ``split_paths`` and ``build_dataset``.

    Args:
        root: dataset folder.
        meta: class metadata.
        batch_size: images per process and training step.
        eval_batch_size: images per process at validation/test (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        train_transforms / test_transforms: lists of transforms (Hydra-instantiated), see
            :mod:`proscale.data.transforms`; ``None`` = the family's paper recipe
            (``default_train_transforms`` / ``default_test_transforms``), ``[]`` = none.
        train_split / val_split / test_split: split names (``test_split=None`` tests on ``val_split``).
        validate: at setup, check that every file a split names exists with the size its annotations give
            (header reads, no decoding); the annotation JSONs are always checked (ids, categories, structure).
        verify_images: also decode every image and label map at setup (slow for large datasets).
        allow_empty: accept a split without any annotated image (by default an error: training would learn
            "void" and validation would report NaN metrics).
    """

    name = "dataset"
    layout = ""
    eval_tasks: tuple[str, ...] = ("panoptic", "instance", "semantic")

    def __init__(
        self,
        root: str | Path,
        meta: DatasetMeta,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        train_transforms: Sequence | None = None,
        test_transforms: Sequence | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        validate: bool = True,
        verify_images: bool = False,
        allow_empty: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"{self.name}: batch sizes must be >= 1, got {batch_size}, {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"{self.name}: num_workers must be >= 0, got {num_workers}")
        self.root = Path(root)
        self.meta = meta
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_transform = Compose(
            self.default_train_transforms() if train_transforms is None else train_transforms
        )
        self.test_transform = Compose(self.default_test_transforms() if test_transforms is None else test_transforms)
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.pin_memory, self.drop_last = pin_memory, drop_last
        self.validate, self.verify_images, self.allow_empty = validate, verify_images, allow_empty
        self.datasets: dict[str, Dataset] = {}

    # ----------------------------------------------------------------------------- family interface
    def split_paths(self, split: str) -> dict[str, Path]:
        """Files/folders a split needs, ``{what: path}``."""
        raise NotImplementedError

    def build_dataset(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split``; ``train`` selects the training transforms (else test + ``gt``)."""
        raise NotImplementedError

    def default_train_transforms(self) -> list:
        return []

    def default_test_transforms(self) -> list:
        return []

    def gt_files(self, split: str = "val") -> dict[str, Path]:
        """Official ground-truth files of a split (for offline evaluators); default: ``split_paths``."""
        return self.split_paths(self.splits.get(split, split))

    # ---------------------------------------------------------------------------------- lightning
    def check_layout(self, split: str) -> None:
        require_paths(self.split_paths(split), f"{self.name} ({split!r} split)", self.layout)

    def _dataset(self, stage: str) -> Dataset:
        """The dataset of ``stage`` ("train" / "val" / "test"), built once; test reuses val when they coincide."""
        if stage not in self.datasets:
            split = self.splits[stage]
            if stage == "test" and split == self.splits["val"] and "val" in self.datasets:
                self.datasets[stage] = self.datasets["val"]
            else:
                self.check_layout(split)
                dataset = self.build_dataset(split, train=stage == "train")
                self.check_split(dataset, split)
                self.datasets[stage] = dataset
        return self.datasets[stage]

    def check_split(self, dataset: Dataset, split: str) -> None:
        """Setup-time checks of a freshly built split: not empty, files present and of the right size
        (``validate``), decodable (``verify_images``). Raises :class:`DataValidationError`."""
        where = f"{self.name} ({split!r} split)"
        if len(dataset) == 0:
            raise DataValidationError(f"{where}: the split has no images{_source(dataset)}")
        annotated = getattr(dataset, "num_annotated", None)
        if annotated == 0 and not self.allow_empty:
            raise DataValidationError(
                f"{where}: none of its {len(dataset)} images has an annotation{_source(dataset)}; training would "
                "learn only 'void' and validation would report NaN metrics. Set data.allow_empty=true if this is intended"
            )
        if (self.validate or self.verify_images) and hasattr(dataset, "check_files"):
            started = time.perf_counter()
            dataset.check_files(verify_images=self.verify_images)
            log.info(f"{where}: {len(dataset)} images checked in {time.perf_counter() - started:.1f} s")

    def setup(self, stage: str | None = None) -> None:
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in stages.get(stage or "", ("train", "val", "test")):
            self._dataset(name)

    def _loader(self, stage: str) -> DataLoader:
        dataset = self._dataset(stage)
        train = stage == "train"
        sampler = None
        if not train and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        common = {
            "num_workers": self.num_workers,
            "collate_fn": collate_batch,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }
        if train:  # resumable mid-epoch (proscale/data/resumable.py); same batches as DataLoader(shuffle=True)
            batch_sampler = SkippingBatchSampler(RandomSampler(dataset), self.batch_size, self.drop_last)
            return ResumableDataLoader(
                dataset, batch_sampler=batch_sampler, batches_done=self._train_batches_done, **common
            )
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler, **common)

    def _train_batches_done(self) -> int:
        """Batches of the current training epoch already trained (Lightning's loop progress), for checkpoints."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, classes={self.meta.num_classes}, splits={self.splits})"
