"""``data=synthetic`` (the default): the generated shapes dataset, created on first use and reused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proscale.data.coco_panoptic import PanopticDataModule
from proscale.data.datamodule import lsj_recipe
from proscale.data.synthetic import SyntheticConfig, ensure_synthetic, is_current, synthetic_meta

SYNTHETIC_LAYOUT = """\
<root>/                               default data/synthetic (generated; scripts/make_synthetic.py)
  synthetic.json                      generator version + parameters
  train/*.jpg  val/*.jpg
  panoptic_train/*.png  panoptic_val/*.png
  annotations/panoptic_{train,val}.json  instances_{train,val}.json"""


class SyntheticDataModule(PanopticDataModule):
    """Panoptic datamodule over :mod:`proscale.data.synthetic`; generation happens in ``prepare_data``
    (rank 0 of each node) and, if still needed, in ``setup``. ``meta`` is known without any file.

    Args:
        root: where the dataset lives (created if missing; regenerated when the parameters change).
        num_train, num_val, height, width, seed, min_objects, max_objects, min_object_size,
            max_object_fraction, max_stuff_regions: generator parameters
            (:class:`~proscale.data.synthetic.SyntheticConfig`; smaller ``max_objects`` or a larger
            ``min_object_size`` make the problem easier).
        **kwargs: :class:`~proscale.data.datamodule.SegmentationDataModule` arguments.
    """

    name = "synthetic"
    layout = SYNTHETIC_LAYOUT

    def default_train_transforms(self) -> list:
        """LSJ scaled to the images (0.5-1.5: COCO's 0.1 would shrink 8 px objects below a pixel)."""
        return lsj_recipe((self.generator_config.height, self.generator_config.width), 0.5, 1.5)

    def __init__(
        self,
        root: str | Path = "data/synthetic",
        num_train: int = 4800,
        num_val: int = 60,
        height: int = 128,
        width: int = 160,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 4,
        min_object_size: int = 24,
        max_object_fraction: float = 0.6,
        max_stuff_regions: int = 3,
        thing_fills: Sequence[str] = ("solid",),
        **kwargs: Any,
    ) -> None:
        self.generator_config = SyntheticConfig(
            num_train=num_train,
            num_val=num_val,
            height=height,
            width=width,
            seed=seed,
            min_objects=min_objects,
            max_objects=max_objects,
            min_object_size=min_object_size,
            max_object_fraction=max_object_fraction,
            max_stuff_regions=max_stuff_regions,
            thing_fills=tuple(thing_fills),
        )
        kwargs.setdefault("train_split", "train")
        kwargs.setdefault("val_split", "val")
        super().__init__(root=root, meta=synthetic_meta(), **kwargs)

    def prepare_data(self) -> None:
        ensure_synthetic(self.root, self.generator_config)

    def setup(self, stage: str | None = None) -> None:
        if not is_current(self.root, self.generator_config):
            ensure_synthetic(self.root, self.generator_config)
        super().setup(stage)
