"""COCO instance, ADE20K (semantic + panoptic) and Cityscapes loaders on tiny files in their standard layouts,
and the Hydra ``data=`` configs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from pycocotools import mask as mask_utils

from proscale.data import (
    ADE20KPanopticDataModule,
    ADE20KSemanticDataModule,
    CityscapesPanopticDataModule,
    CocoInstanceDataModule,
)
from proscale.data.image_io import id_to_rgb
from proscale.testing.data import write_coco_panoptic

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_coco_instance_polygon_rle_and_crowd(tmp_path):
    h, w = 10, 12
    for split in ("train2017", "val2017"):
        save(tmp_path / split / "000000000001.jpg", np.full((h, w, 3), 128, dtype=np.uint8))
    rle_mask = np.zeros((h, w), dtype=np.uint8)
    rle_mask[6:9, 1:5] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    crowd = np.zeros((h, w), dtype=np.uint8)
    crowd[0:2, 8:12] = 1
    # Uncompressed RLE: column-major run lengths starting with zeros.
    crowd_counts = mask_utils.decode(mask_utils.encode(np.asfortranarray(crowd)))
    flat = crowd_counts.flatten(order="F").tolist()
    runs, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    runs.append(run)
    polygon = [1.0, 1.0, 5.0, 1.0, 5.0, 4.0, 1.0, 4.0]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 18, "segmentation": [polygon], "area": 12.0, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "area": 12.0, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": compressed["counts"].decode()}},
        {"id": 12, "image_id": 1, "category_id": 1, "area": 8.0, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": runs}},
    ]  # fmt: skip
    data = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": h, "width": w}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))

    dm = CocoInstanceDataModule(root=tmp_path, batch_size=1, num_workers=0, test_transforms=[])
    assert dm.meta.num_classes == 80 and dm.meta.contiguous_id(18) == 16
    dm.setup("fit")
    item = dm.datasets["val"][0]
    polygon_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))).astype(bool)
    assert polygon_mask.sum() > 0
    # crowd (id 12) is not a training target; the polygon and the compressed RLE are, with contiguous classes
    assert item["labels"].tolist() == [16, 0]
    assert torch.equal(item["masks"][0], torch.from_numpy(polygon_mask))
    assert torch.equal(item["masks"][1], torch.from_numpy(rle_mask.astype(bool)))
    gt = item["gt"]["instances"]
    assert gt["labels"].tolist() == [16, 0, 0] and gt["iscrowd"].tolist() == [0, 0, 1] and gt["ann_ids"] == [10, 11, 12]
    assert torch.equal(gt["masks"][2], torch.from_numpy(crowd.astype(bool)))
    assert dm.eval_tasks == ("instance",)

    # Default recipe: COCO test resize (short side 800, long side <= 1333); masks follow, gt stays original.
    dm = CocoInstanceDataModule(root=tmp_path, batch_size=1, num_workers=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image_sizes"] == [(800, 960)] and batch["orig_sizes"] == [(h, w)]
    assert batch["images"].shape[-2:] == (800, 960)
    assert batch["targets"][0]["masks"].shape == (2, 800, 960)
    assert batch["gt"][0]["instances"]["masks"].shape == (3, h, w)


def test_ade20k_semantic_shift_and_ignore(tmp_path):
    labels = np.array([[0, 1, 1, 150], [2, 2, 0, 150]], dtype=np.uint8).repeat(4, 0).repeat(4, 1)  # 8x16
    for split in ("training", "validation"):
        save(tmp_path / "images" / split / "ADE_x_00000001.jpg", np.zeros((8, 16, 3), dtype=np.uint8))
        save(tmp_path / "annotations" / split / "ADE_x_00000001.png", labels)
    dm = ADE20KSemanticDataModule(root=tmp_path, batch_size=1, num_workers=0, test_transforms=[])
    assert dm.meta.num_classes == 150 and dm.meta.class_names[0] == "wall"
    dm.setup("validate")
    item = dm.datasets["val"][0]
    expected = np.where(labels == 0, 255, labels.astype(np.int64) - 1)
    assert torch.equal(item["gt"]["sem_seg"], torch.from_numpy(expected))
    assert item["labels"].tolist() == [0, 1, 149]
    assert torch.equal(item["masks"][2], torch.from_numpy(labels == 150))
    assert [s["category"] for s in item["gt"]["segments"]] == [0, 1, 149]
    assert dm.eval_tasks == ("semantic",)

    bad = labels.copy()
    bad[0, 0] = 151
    save(tmp_path / "annotations" / "validation" / "ADE_x_00000001.png", bad)
    with pytest.raises(ValueError, match=r"ADE_x_00000001\.png: label values \[151\] outside the 150 classes"):
        dm.datasets["val"][0]
    (tmp_path / "annotations" / "validation" / "ADE_x_00000001.png").unlink()
    with pytest.raises(ValueError, match=r"ADE_x_00000001\.png: label PNG file is missing"):
        dm.datasets["val"][0]


def test_ade20k_semantic_crop_pads_with_ignore(tmp_path):
    torch.manual_seed(0)
    save(tmp_path / "images" / "training" / "a.jpg", np.zeros((20, 30, 3), dtype=np.uint8))
    save(tmp_path / "annotations" / "training" / "a.png", np.full((20, 30), 3, dtype=np.uint8))
    from proscale.data.transforms import RandomCrop, RandomFlip, ResizeShortestEdge

    dm = ADE20KSemanticDataModule(
        root=tmp_path, batch_size=1, num_workers=0,
        train_transforms=[ResizeShortestEdge([16, 24], 64), RandomCrop(16), RandomFlip()],
    )  # fmt: skip
    batch = next(iter(dm._loader("train")))  # only the training split exists here
    assert batch["images"].shape[-2:] == (32, 32)  # crop 16 -> padded to the divisibility
    h, w = batch["image_sizes"][0]
    assert h == 16 and w == 16
    assert batch["targets"][0]["labels"].tolist() == [2]
    assert batch["targets"][0]["masks"][0, :16, :16].all() and batch["targets"][0]["masks"][0].sum() == 256


def test_ade20k_panoptic_layout(tmp_path):
    ids = np.zeros((6, 6), dtype=np.int64)
    ids[:, :3] = 1  # wall (category 0, stuff)
    ids[:, 3:] = 5 + 256  # bed (category 7, thing)
    categories = [{"id": i, "name": f"c{i}", "isthing": int(i == 7)} for i in range(150)]
    for name, image_split in (("train", "training"), ("val", "validation")):
        write_coco_panoptic(
            tmp_path / "images" / image_split, tmp_path / f"ade20k_panoptic_{name}", tmp_path / f"ade20k_panoptic_{name}.json",
            [{"image": np.zeros((6, 6, 3), dtype=np.uint8), "ids": ids, "image_id": "ADE_val_00000001",
              "file_name": "ADE_val_00000001.jpg",
              "segments_info": [{"id": 1, "category_id": 0}, {"id": 5 + 256, "category_id": 7}]}],
            categories,
        )  # fmt: skip
    dm = ADE20KPanopticDataModule(root=tmp_path, batch_size=1, num_workers=0, test_transforms=[])
    assert dm.meta.isthing[7] and not dm.meta.isthing[0] and sum(dm.meta.isthing) == 100
    dm.setup("validate")
    item = dm.datasets["val"][0]
    assert item["image_id"] == 0  # string ids ("ADE_val_00000001") become the index in the JSON
    assert item["labels"].tolist() == [0, 7]
    assert torch.equal(item["masks"][1], torch.from_numpy(ids == 261))


def test_cityscapes_panoptic_layout(tmp_path):
    city_id = "aachen_000000_000019"
    ids = np.full((8, 16), 7, dtype=np.int64)  # road (label id 7 -> trainId 0)
    ids[2:6, 4:10] = 26001  # a car (label id 26 -> trainId 13), instance 1
    ids[0, :] = 0  # void (ego vehicle etc.)
    for split in ("train", "val"):
        save(
            tmp_path / "leftImg8bit" / split / "aachen" / f"{city_id}_leftImg8bit.png",
            np.zeros((8, 16, 3), dtype=np.uint8),
        )
        save(tmp_path / "gtFine" / f"cityscapes_panoptic_{split}" / f"{city_id}_gtFine_panoptic.png", id_to_rgb(ids))
        data = {
            "images": [{"id": city_id, "file_name": f"{city_id}_leftImg8bit.png", "height": 8, "width": 16}],
            "annotations": [{"image_id": city_id, "file_name": f"{city_id}_gtFine_panoptic.png", "segments_info": [
                {"id": 7, "category_id": 7, "iscrowd": 0, "area": 90},
                {"id": 26001, "category_id": 26, "iscrowd": 0, "area": 24}]}],
            "categories": [{"id": 7, "name": "road", "isthing": 0}, {"id": 26, "name": "car", "isthing": 1}],
        }  # fmt: skip
        (tmp_path / "gtFine" / f"cityscapes_panoptic_{split}.json").write_text(json.dumps(data))
    dm = CityscapesPanopticDataModule(root=tmp_path, batch_size=1, num_workers=0)
    assert dm.meta.num_classes == 19 and sum(dm.meta.isthing) == 8
    dm.setup("validate")
    item = dm.datasets["val"][0]
    assert item["labels"].tolist() == [0, 13]
    assert torch.equal(item["masks"][1], torch.from_numpy(ids == 26001))
    assert (item["gt"]["sem_seg"][0] == 255).all() and item["gt"]["sem_seg"][3, 5] == 13


@pytest.mark.parametrize(
    "name, family, classes",
    [
        ("synthetic", "SyntheticDataModule", 10),
        ("coco_panoptic", "CocoPanopticDataModule", 133),
        ("coco_instance", "CocoInstanceDataModule", 80),
        ("ade20k", "ADE20KSemanticDataModule", 150),
        ("ade20k_panoptic", "ADE20KPanopticDataModule", 150),
        ("cityscapes", "CityscapesPanopticDataModule", 19),
    ],
)
def test_data_configs_instantiate_with_meta_before_any_file(tmp_path, name, family, classes):
    with initialize_config_dir(config_dir=str(CONF_DATA), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[f"root={tmp_path / name}"])
    dm = instantiate(cfg)
    assert type(dm).__name__ == family and dm.meta.num_classes == classes
    assert dm.batch_size >= 1 and dm.num_workers >= 0
    assert not (tmp_path / name).exists()  # construction reads/writes nothing
    if name != "synthetic":
        with pytest.raises(ValueError, match="Expected layout"):
            dm.setup("fit")
