"""Data validated at setup: problems in annotation files and on disk stop the run before training, in one error
that names the file, lists the first problems and counts them."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from proscale.data.ade20k import ADE20KSemanticDataModule
from proscale.data.coco_instance import CocoInstanceDataModule, CocoInstanceDataset
from proscale.data.coco_panoptic import CocoPanopticDataset, PanopticDataModule
from proscale.data.validation import DataValidationError
from proscale.testing.data import write_coco_panoptic

CATEGORIES = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]


def write_split(root, split: str, names=("a.jpg", "b.jpg", "c.jpg"), annotated=True):
    """A COCO-format panoptic split under the PanopticDataModule default layout; 8x10 images."""
    rng = np.random.default_rng(0)
    samples = []
    for image_id, name in enumerate(names, start=1):
        ids = np.full((8, 10), 200, dtype=np.int64)
        ids[2:5, 3:7] = 100
        segments = [{"id": 100, "category_id": 1}, {"id": 200, "category_id": 2}]
        if not annotated:
            ids[:], segments = 0, []
        image = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        samples.append({"image": image, "ids": ids, "segments_info": segments, "image_id": image_id, "file_name": name})
    json_path = root / "annotations" / f"panoptic_{split}.json"
    write_coco_panoptic(root / split, root / f"panoptic_{split}", json_path, samples, CATEGORIES)
    return json_path


def edit(path, fn):
    data = json.loads(path.read_text())
    data = fn(data) or data
    path.write_text(json.dumps(data))


def datamodule(root, **kwargs):
    return PanopticDataModule(root, meta="json", num_workers=0, train_transforms=[], test_transforms=[], **kwargs)


@pytest.fixture
def root(tmp_path):
    write_split(tmp_path, "train")
    write_split(tmp_path, "val")
    return tmp_path


def test_duplicate_image_ids_are_an_error_naming_both_images(root):
    json_path = root / "annotations/panoptic_train.json"

    def share_id(d):  # today: last one wins, so a.jpg silently trains on b.png's labels
        d["images"][1]["id"] = d["annotations"][1]["image_id"] = 1

    edit(json_path, share_id)
    with pytest.raises(DataValidationError) as error:
        CocoPanopticDataset(root / "train", root / "panoptic_train", json_path)
    message = str(error.value)
    assert str(json_path) in message and "image id 1 is used by 2 images (a.jpg, b.jpg)" in message
    assert "image id 1 has more than one annotation entry" in message
    assert "2 problems in the data" in message


def test_annotation_for_an_unknown_image_and_shared_png(root):
    json_path = root / "annotations/panoptic_train.json"

    def break_refs(d):
        d["annotations"][0]["image_id"] = 99
        d["annotations"][2]["file_name"] = d["annotations"][1]["file_name"]

    edit(json_path, break_refs)
    with pytest.raises(DataValidationError) as error:
        CocoPanopticDataset(root / "train", root / "panoptic_train", json_path)
    assert "annotation a.png refers to unknown image id 99" in str(error.value)
    assert "panoptic PNG b.png is the annotation of more than one image" in str(error.value)


def test_many_problems_are_listed_up_to_ten_and_counted(root):
    json_path = root / "annotations/panoptic_train.json"
    names = [f"{k:02d}.jpg" for k in range(12)]
    write_split(root, "train", names=names)

    def unknown_category(d):
        for annotation in d["annotations"]:
            annotation["segments_info"][0]["category_id"] = 77

    edit(json_path, unknown_category)
    with pytest.raises(DataValidationError) as error:
        CocoPanopticDataset(root / "train", root / "panoptic_train", json_path)
    message = str(error.value)
    assert "12 problems in the data" in message and "... and 2 more" in message
    assert message.count("has unknown category id 77") == 10


@pytest.mark.parametrize("top_level", [[], "text", 3])
def test_json_top_level_not_an_object(root, top_level):
    json_path = root / "annotations/panoptic_train.json"
    json_path.write_text(json.dumps(top_level))
    with pytest.raises(DataValidationError, match=r"panoptic_train\.json: the top level of an annotation JSON must"):
        CocoPanopticDataset(root / "train", root / "panoptic_train", json_path)
    inst = root / "inst.json"
    inst.write_text(json.dumps(top_level))
    with pytest.raises(DataValidationError, match=r"inst\.json: the top level of an annotation JSON must"):
        CocoInstanceDataset(root / "train", inst)


def test_missing_files_and_sizes_fail_at_setup_not_when_the_batch_is_read(root):
    (root / "val/b.jpg").unlink()
    (root / "panoptic_val/c.png").unlink()
    edit(root / "annotations/panoptic_val.json", lambda d: d["images"][0].update(height=9))
    with pytest.raises(DataValidationError) as error:
        datamodule(root).setup("fit")  # before the first training step, not when validation reads the batch
    message = str(error.value)
    assert "3 problems in the data" in message  # the PNG is checked against its image, not the JSON
    assert "val/b.jpg: image file is missing" in message
    assert "panoptic_val/c.png: panoptic PNG file is missing" in message
    assert "val/a.jpg: image size 8x10 (h x w) does not match the size in panoptic_val.json 9x10" in message
    assert datamodule(root, validate=False).setup("fit") is None  # opt-out: the old behaviour (errors per batch)


def test_png_size_is_checked_against_its_image_from_the_headers(root):
    Image.fromarray(np.zeros((8, 9, 3), dtype=np.uint8)).save(root / "panoptic_train/a.png")
    with pytest.raises(DataValidationError, match=r"panoptic_train/a\.png: panoptic PNG size 8x9 .* its image a\.jpg"):
        datamodule(root).setup("fit")


def test_verify_images_decodes_every_file_up_front(root):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=100)
    (root / "train/c.jpg").write_bytes(buffer.getvalue()[:-40])  # header intact, pixel data cut
    datamodule(root).setup("fit")  # the header check cannot see a truncated body ...
    with pytest.raises(DataValidationError, match=r"train/c\.jpg: cannot decode image \(corrupt or truncated"):
        datamodule(root, verify_images=True).setup("fit")  # ... decoding does


def test_empty_split_is_an_error(root):
    edit(root / "annotations/panoptic_train.json", lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(DataValidationError, match=r"'train' split\): the split has no images \(.*panoptic_train"):
        datamodule(root).setup("fit")


def test_split_without_annotations_is_an_error_unless_allowed(root):
    write_split(root, "val", annotated=False)
    with pytest.raises(DataValidationError, match=r"'val' split\): none of its 3 images has an annotation"):
        datamodule(root).setup("fit")
    dm = datamodule(root, allow_empty=True)
    dm.setup("fit")
    assert dm.datasets["val"].num_annotated == 0


def test_instance_json_duplicates_and_unknown_references(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train").mkdir()
    for name in ("x.png", "y.png"):
        Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "train" / name)
    polygon = [[1, 1, 4, 1, 4, 4, 1, 4]]
    data = {
        "images": [{"id": 1, "file_name": "x.png", "height": 6, "width": 6},
                   {"id": 1, "file_name": "y.png", "height": 6, "width": 6}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon, "area": 9, "iscrowd": 0},
            {"id": 1, "image_id": 7, "category_id": 1, "segmentation": polygon, "area": 9, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    path = tmp_path / "annotations/instances_train.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataValidationError) as error:
        CocoInstanceDataset(tmp_path / "train", path)
    message = str(error.value)
    assert "image id 1 is used by 2 images (x.png, y.png)" in message
    assert (
        "annotation 1 refers to unknown image id 7" in message and "annotation id 1 is used more than once" in message
    )

    data["images"][1]["id"] = 2
    data["images"][1]["height"] = 5
    data["annotations"] = data["annotations"][:1]
    path.write_text(json.dumps(data))
    dm = CocoInstanceDataModule(tmp_path, meta="json", train_split="train", val_split="train", num_workers=0)
    with pytest.raises(DataValidationError, match=r"train/y\.png: image size 6x6 .* does not match the size in"):
        dm.setup("fit")


def test_ade20k_missing_label_map_fails_at_setup(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for name in ("a", "b"):
            Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / split / f"{name}.jpg")
            Image.fromarray(np.ones((6, 8), dtype=np.uint8)).save(tmp_path / "annotations" / split / f"{name}.png")
    (tmp_path / "annotations/validation/b.png").unlink()
    Image.fromarray(np.ones((6, 7), dtype=np.uint8)).save(tmp_path / "annotations/training/a.png")
    dm = ADE20KSemanticDataModule(tmp_path, num_workers=0, train_transforms=[], test_transforms=[])
    with pytest.raises(DataValidationError) as error:
        dm.setup("fit")
    assert "annotations/training/a.png: label PNG size 6x7 (h x w) does not match its image a.jpg 6x8" in str(
        error.value
    )
    dm.datasets.clear()
    with pytest.raises(DataValidationError, match=r"annotations/validation/b\.png: label PNG file is missing"):
        dm.setup("validate")
