"""COCO-format panoptic reading: targets and ground truth decoded from a hand-written PNG/JSON, exactly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.data.coco_panoptic import CocoPanopticDataModule, CocoPanopticDataset, PanopticDataModule
from proscale.data.image_io import id_to_rgb, read_panoptic_png, rgb_to_id
from proscale.testing.data import write_coco_panoptic

# Category ids with gaps, as in COCO: contiguous index 0 <- 1 (thing), 1 <- 3 (thing), 2 <- 149 (stuff).
CATEGORIES = [
    {"id": 149, "name": "road", "isthing": 0},
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
]
PERSON, CROWD, ROAD = 5, 70000, 300 + 256 * 2  # ids that need all three RGB channels / two channels


def hand_written_ids() -> np.ndarray:
    """6x8 id map: a person (id 5), a crowd of cars (id 70000), road (id 812) and void (0)."""
    ids = np.full((6, 8), ROAD, dtype=np.int64)
    ids[0:2, 0:3] = PERSON
    ids[4:6, 6:8] = CROWD
    ids[5, 0] = 0
    ids[3, 3] = 0
    return ids


@pytest.fixture
def panoptic_files(tmp_path):
    ids = hand_written_ids()
    image = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    segments = [
        {"id": PERSON, "category_id": 1},
        {"id": CROWD, "category_id": 3, "iscrowd": 1},
        {"id": ROAD, "category_id": 149},
    ]
    samples = [{"image": image, "ids": ids, "segments_info": segments, "image_id": 42, "file_name": "a.png"}]
    write_coco_panoptic(
        tmp_path / "val", tmp_path / "panoptic_val", tmp_path / "annotations/panoptic_val.json", samples, CATEGORIES
    )
    return tmp_path, image, ids


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 70000, 256**3 - 1]])
    rgb = id_to_rgb(ids)
    assert rgb[1, 2].tolist() == [70000 % 256, (70000 // 256) % 256, 70000 // 65536]
    assert np.array_equal(rgb_to_id(rgb), ids)


def test_png_decodes_to_the_written_ids(panoptic_files):
    root, _, ids = panoptic_files
    assert np.array_equal(read_panoptic_png(root / "panoptic_val/a.png"), ids)


def test_targets_and_ground_truth_match_hand_written_annotation(panoptic_files):
    root, image, ids = panoptic_files
    dataset = CocoPanopticDataset(
        root / "val", root / "panoptic_val", root / "annotations/panoptic_val.json", with_gt=True
    )
    assert dataset.meta.category_ids == [1, 3, 149]
    assert dataset.meta.isthing == [True, True, False]
    item = dataset[0]
    assert item["image_id"] == 42 and item["file_name"] == "a.png" and item["orig_size"] == (6, 8)
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1))
    # The crowd segment is not a training target; the person and the road are, in JSON order.
    assert item["labels"].tolist() == [0, 2]
    assert torch.equal(item["masks"][0], torch.from_numpy(ids == PERSON))
    assert torch.equal(item["masks"][1], torch.from_numpy(ids == ROAD))
    assert item["masks"][1].sum() == 48 - 6 - 4 - 2
    # Void pixels belong to no target.
    assert not item["masks"][:, 5, 0].any() and not item["masks"][:, 3, 3].any()

    gt = item["gt"]
    assert torch.equal(gt["panoptic"], torch.from_numpy(ids))
    assert gt["segments"] == [
        {"id": PERSON, "category": 0, "iscrowd": 0, "area": 6},
        {"id": CROWD, "category": 1, "iscrowd": 1, "area": 4},
        {"id": ROAD, "category": 2, "iscrowd": 0, "area": 36},
    ]
    expected_sem = np.full((6, 8), 2)
    expected_sem[0:2, 0:3] = 0
    expected_sem[4:6, 6:8] = 1  # crowd regions keep their class in the semantic map (as Mask2Former's conversion)
    expected_sem[5, 0] = expected_sem[3, 3] = 255
    assert torch.equal(gt["sem_seg"], torch.from_numpy(expected_sem))


def test_datamodule_batch_from_hand_written_files(panoptic_files):
    root, image, ids = panoptic_files
    dm = PanopticDataModule(root, meta="json", train_split="val", val_split="val", batch_size=1, num_workers=0)
    assert dm.meta.num_classes == 3
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (1, 3, 32, 32)
    assert batch["image_sizes"] == [(6, 8)] and batch["orig_sizes"] == [(6, 8)]
    assert batch["image_ids"] == [42]
    assert batch["targets"][0]["masks"].shape == (2, 32, 32)
    assert torch.equal(batch["targets"][0]["masks"][0, :6, :8], torch.from_numpy(ids == PERSON))
    assert not batch["targets"][0]["masks"][:, 6:, :].any() and not batch["targets"][0]["masks"][:, :, 8:].any()
    assert batch["gt"][0]["sem_seg"].shape == (6, 8)
    files = dm.gt_files("val")
    assert files["panoptic_json"] == root / "annotations/panoptic_val.json"


def test_coco_panoptic_builtin_meta_needs_no_files(tmp_path):
    dm = CocoPanopticDataModule(root=tmp_path / "nowhere")
    assert dm.meta.num_classes == 133 and sum(dm.meta.isthing) == 80
    assert dm.meta.category_ids[:3] == [1, 2, 3] and dm.meta.category_ids[-1] == 200


def test_json_categories_are_sorted_and_validated(panoptic_files):
    root, _, _ = panoptic_files
    path = root / "annotations/panoptic_val.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"].append({"id": 9, "category_id": 2, "iscrowd": 0, "area": 1})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"panoptic_val.json.*a.png.*segment 9 has unknown category id 2"):
        CocoPanopticDataset(root / "val", root / "panoptic_val", path)


def test_png_must_be_rgb(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match=r"gray.png.*must be RGB"):
        read_panoptic_png(tmp_path / "gray.png")
