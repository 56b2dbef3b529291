"""Cityscapes panoptic (19 classes, 8 things) in the layout cityscapesScripts' ``createPanopticImgs.py`` writes.

The panoptic JSON's images are named by id (``aachen_000000_000019``); the image file is found under the
city folder as ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``. Category ids are Cityscapes label ids
(7 = road ... 33 = bicycle); the contiguous index equals the trainId.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proscale.data.coco_panoptic import PanopticDataModule
from proscale.data.datamodule import crop_recipe
from proscale.structures import DatasetMeta

CITYSCAPES_LAYOUT = """\
<root>/                               e.g. data/cityscapes
  leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/
    cityscapes_panoptic_{train,val}.json             (from cityscapesscripts createPanopticImgs.py)
    cityscapes_panoptic_{train,val}/<city>_<seq>_<frame>_gtFine_panoptic.png"""


class CityscapesPanopticDataModule(PanopticDataModule):
    """Cityscapes fine annotations, panoptic conversion; evaluation on ``val`` (test GT is not public)."""

    name = "Cityscapes panoptic"
    layout = CITYSCAPES_LAYOUT

    def default_train_transforms(self) -> list:
        return crop_recipe(1024, (512, 1024), 4096)

    def __init__(
        self, root: str | Path = "data/cityscapes", meta: DatasetMeta | str = "cityscapes", **kwargs: Any
    ) -> None:
        kwargs.setdefault("train_split", "train")
        kwargs.setdefault("val_split", "val")
        super().__init__(
            root=root,
            meta=meta,
            image_dir="leftImg8bit/{split}",
            panoptic_dir="gtFine/cityscapes_panoptic_{split}",
            panoptic_json="gtFine/cityscapes_panoptic_{split}.json",
            instance_json=None,
            image_path_rule="cityscapes",
            **kwargs,
        )
