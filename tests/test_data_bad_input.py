"""Bad input: each case raises an error naming the file and the problem, or is handled, counted and logged once."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.data.coco_instance import CocoInstanceDataset
from proscale.data.coco_panoptic import CocoPanopticDataModule, CocoPanopticDataset
from proscale.data.image_io import read_rgb_image
from proscale.testing.data import write_coco_panoptic

CATEGORIES = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]


def two_segment_ids(h=8, w=10):
    ids = np.full((h, w), 200, dtype=np.int64)
    ids[2:5, 3:7] = 100
    return ids


@pytest.fixture
def dataset_root(tmp_path):
    """Three images: a.jpg (thing + stuff), b.jpg (no segments at all), c.jpg (thing + stuff)."""
    rng = np.random.default_rng(0)
    samples = []
    for image_id, name in enumerate(["a.jpg", "b.jpg", "c.jpg"], start=1):
        ids = two_segment_ids() if name != "b.jpg" else np.zeros((8, 10), dtype=np.int64)
        segments = [{"id": 100, "category_id": 1}, {"id": 200, "category_id": 2}] if name != "b.jpg" else []
        image = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        samples.append({"image": image, "ids": ids, "segments_info": segments, "image_id": image_id, "file_name": name})
    write_coco_panoptic(tmp_path / "img", tmp_path / "pan", tmp_path / "pan.json", samples, CATEGORIES)
    return tmp_path


def open_dataset(root, **kwargs):
    return CocoPanopticDataset(root / "img", root / "pan", root / "pan.json", with_gt=True, **kwargs)


def edit_json(root, fn):
    data = json.loads((root / "pan.json").read_text())
    fn(data)
    (root / "pan.json").write_text(json.dumps(data))


def test_corrupt_image_names_the_file(dataset_root):
    (dataset_root / "img/a.jpg").write_bytes(b"this is not a jpeg at all")
    with pytest.raises(ValueError, match=r"a\.jpg: cannot decode image \(corrupt or truncated"):
        open_dataset(dataset_root)[0]


def test_truncated_image_names_the_file(dataset_root):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (dataset_root / "img/a.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"a\.jpg: cannot decode image \(corrupt or truncated"):
        read_rgb_image(dataset_root / "img/a.jpg")


def test_missing_png_names_the_file(dataset_root):
    (dataset_root / "pan/c.png").unlink()
    dataset = open_dataset(dataset_root)
    with pytest.raises(ValueError, match=r"pan/c\.png: panoptic PNG file is missing"):
        dataset[2]


def test_missing_image_names_the_file(dataset_root):
    (dataset_root / "img/c.jpg").unlink()
    with pytest.raises(ValueError, match=r"img/c\.jpg: image file is missing"):
        open_dataset(dataset_root)[2]


def test_json_segment_absent_from_png_is_dropped_counted_and_logged_once(dataset_root, caplog):
    def add_ghost(data):
        for ann in data["annotations"]:
            if ann["segments_info"]:
                ann["segments_info"].append({"id": 300, "category_id": 1, "iscrowd": 0, "area": 5})

    edit_json(dataset_root, add_ghost)
    dataset = open_dataset(dataset_root)
    with caplog.at_level(logging.WARNING, logger="proscale.data"):
        first, third = dataset[0], dataset[2]
    for item in (first, third):
        assert item["labels"].tolist() == [0, 1]  # the real segments only
        assert [s["id"] for s in item["gt"]["segments"]] == [100, 200]
    assert dataset.issues.counts["JSON segment absent from the PNG dropped"] == 2
    messages = [r.getMessage() for r in caplog.records if "absent from the PNG" in r.getMessage()]
    assert len(messages) == 1 and "a.png id 300" in messages[0]


def test_png_id_without_json_segment_becomes_void(dataset_root):
    edit_json(dataset_root, lambda d: d["annotations"][0]["segments_info"].pop(0))  # forget segment 100 of a.jpg
    dataset = open_dataset(dataset_root)
    item = dataset[0]
    assert item["labels"].tolist() == [1]
    assert (item["gt"]["panoptic"][2:5, 3:7] == 0).all()  # void, not a wrong label
    assert (item["gt"]["sem_seg"][2:5, 3:7] == 255).all()
    assert not item["masks"][:, 2:5, 3:7].any()
    assert dataset.issues.counts["PNG segment ids without a JSON entry set to void"] == 1


def test_unknown_category_id_raises_with_file_and_id(dataset_root):
    edit_json(dataset_root, lambda d: d["annotations"][2]["segments_info"][0].update(category_id=77))
    with pytest.raises(ValueError, match=r"pan\.json: image c\.jpg: segment 100 has unknown category id 77"):
        open_dataset(dataset_root)


def test_zero_area_segment_is_dropped_and_counted(dataset_root):
    def zero(data):
        data["annotations"][0]["segments_info"].append({"id": 400, "category_id": 2, "iscrowd": 0, "area": 0})

    edit_json(dataset_root, zero)
    dataset = open_dataset(dataset_root)
    assert dataset.issues.counts["zero-area segment dropped"] == 1
    assert [s["id"] for s in dataset[0]["gt"]["segments"]] == [100, 200]


def test_image_without_annotations_gives_empty_targets_and_void_gt(dataset_root):
    dataset = open_dataset(dataset_root)
    assert dataset.issues.counts["image with no segments (all void)"] == 1
    item = dataset[1]
    assert item["labels"].numel() == 0 and item["masks"].shape == (0, 8, 10)
    assert item["gt"]["segments"] == [] and (item["gt"]["sem_seg"] == 255).all()


def test_image_missing_from_annotations_is_void(dataset_root):
    edit_json(dataset_root, lambda d: d["annotations"].pop(1))
    dataset = open_dataset(dataset_root)
    assert dataset.issues.counts["image without annotation entry (all void)"] == 1
    assert dataset[1]["labels"].numel() == 0


def test_duplicate_and_zero_segment_ids_raise(dataset_root):
    edit_json(dataset_root, lambda d: d["annotations"][0]["segments_info"][1].update(id=100))
    with pytest.raises(ValueError, match=r"a\.jpg: segment id 100 is used twice"):
        open_dataset(dataset_root)


def test_size_mismatch_between_image_and_png_raises(dataset_root):
    Image.fromarray(np.zeros((8, 9, 3), dtype=np.uint8)).save(dataset_root / "pan/a.png")
    with pytest.raises(ValueError, match=r"pan/a\.png: size 8x9 .* does not match its image a\.jpg 8x10"):
        open_dataset(dataset_root)[0]


def test_image_modes_are_converted_to_rgb(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    assert np.array_equal(read_rgb_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))

    rgba = np.random.default_rng(0).integers(0, 256, (6, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_rgb_image(tmp_path / "rgba.png"), rgba[..., :3])  # alpha dropped, colours kept

    gray16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    out = read_rgb_image(tmp_path / "gray16.png")
    assert (
        out.dtype == np.uint8
        and out[0, 1, 0] == round(1000 / 65535 * 255)
        and out[-1, -1, 0] == round(47000 / 65535 * 255)
    )

    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    red = read_rgb_image(tmp_path / "cmyk.jpg")
    assert red.shape == (6, 8, 3)
    assert red[..., 0].min() > 230 and red[..., 1:].max() < 25

    palette = Image.fromarray(gray, mode="L").convert("P")
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(read_rgb_image(tmp_path / "palette.png"), np.repeat(gray[..., None], 3, axis=2))


def exif_rotated_jpeg(path, stored: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=100, exif=exif)


def test_exif_orientation_is_applied_to_the_image_not_the_annotation(tmp_path):
    """As COCO/detectron2: the displayed (EXIF-rotated) image is what the annotation and JSON size refer to."""
    displayed = np.zeros((8, 12, 3), dtype=np.uint8)
    displayed[0:3, 0:4] = (250, 10, 10)  # a red block at the displayed top-left
    ids = np.full((8, 12), 200, dtype=np.int64)
    ids[0:3, 0:4] = 100
    # Orientation 6 = "rotate 90 CW to display": the stored pixels are the displayed ones rotated 90 CCW.
    stored = np.rot90(displayed, k=1).copy()
    write_coco_panoptic(
        tmp_path / "img", tmp_path / "pan", tmp_path / "pan.json",
        [{"image": displayed, "ids": ids, "image_id": 1, "file_name": "r.jpg",
          "segments_info": [{"id": 100, "category_id": 1}, {"id": 200, "category_id": 2}]}],
        CATEGORIES,
    )  # fmt: skip
    exif_rotated_jpeg(tmp_path / "img/r.jpg", stored, orientation=6)
    assert Image.open(tmp_path / "img/r.jpg").size == (8, 12)  # stored as 12 rows x 8 columns
    dataset = CocoPanopticDataset(tmp_path / "img", tmp_path / "pan", tmp_path / "pan.json")
    item = dataset[0]
    assert item["image"].shape == (3, 8, 12)
    thing = item["masks"][item["labels"].tolist().index(0)]
    assert torch.equal(thing, torch.from_numpy(ids == 100))
    red_inside = item["image"][:, thing].float().mean(1)
    assert red_inside[0] > 200 and red_inside[1:].max() < 60  # the red block is where the mask is

    # A JSON that describes the stored (un-rotated) size disagrees with the displayed image: clear error.
    data = json.loads((tmp_path / "pan.json").read_text())
    data["images"][0].update(height=12, width=8)
    (tmp_path / "pan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"r\.jpg: size 8x12 .* does not match the size in pan\.json 12x8"):
        CocoPanopticDataset(tmp_path / "img", tmp_path / "pan", tmp_path / "pan.json")[0]


def test_missing_dataset_folder_names_the_expected_layout(tmp_path):
    dm = CocoPanopticDataModule(root=tmp_path / "coco")
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "COCO panoptic" in message and str(tmp_path / "coco" / "train2017") in message
    assert "Expected layout" in message and "panoptic_train2017.json" in message and "panoptic_val2017/" in message


def test_missing_json_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"annotation JSON .*nothing\.json does not exist"):
        CocoPanopticDataset(tmp_path, tmp_path, tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"annotation JSON .*broken\.json is not valid JSON"):
        CocoPanopticDataset(tmp_path, tmp_path, tmp_path / "broken.json")


def test_instance_json_bad_cases(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "img/x.png")
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "img/empty.png")
    data = {
        "images": [{"id": 1, "file_name": "x.png", "height": 6, "width": 6},
                   {"id": 2, "file_name": "empty.png", "height": 6, "width": 6}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]], "area": 9, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 2, 2]], "area": 1, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3]], "area": 0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(data))
    train = CocoInstanceDataset(tmp_path / "img", path, skip_empty=True)
    assert len(train) == 1  # empty.png skipped for training (counted)
    assert train.issues.counts["degenerate polygon (< 3 points) dropped"] == 1
    assert train.issues.counts["zero-area annotation dropped"] == 1
    assert train.issues.counts["image without annotations"] == 1
    assert train[0]["labels"].tolist() == [0]
    val = CocoInstanceDataset(tmp_path / "img", path, with_gt=True)
    assert len(val) == 2 and val[1]["gt"]["instances"]["masks"].shape == (0, 6, 6)

    data["annotations"][0]["category_id"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"inst\.json: annotation 1 \(image x\.png\) has unknown category id 5"):
        CocoInstanceDataset(tmp_path / "img", path)

    data["annotations"][0]["category_id"] = 1
    data["annotations"][0]["segmentation"] = {"size": [5, 6], "counts": [0, 30]}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotation 1 RLE size \[5, 6\] does not match image x\.png"):
        CocoInstanceDataset(tmp_path / "img", path)[0]
