"""The generated default dataset: deterministic bytes, the promised content, atomic creation and reuse."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from proscale.data import synthetic
from proscale.data.coco_instance import CocoInstanceDataset
from proscale.data.coco_panoptic import CocoPanopticDataset
from proscale.data.image_io import read_panoptic_png, read_rgb_image
from proscale.data.synthetic import SyntheticConfig, ensure_synthetic, render_image, synthetic_meta

SMALL = SyntheticConfig(num_train=6, num_val=3, height=64, width=96, seed=3)


def digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    a = ensure_synthetic(tmp_path / "a", SMALL)
    b = ensure_synthetic(tmp_path / "b", SMALL, workers=2)  # parallel generation writes the same bytes
    c = ensure_synthetic(tmp_path / "c", SyntheticConfig(num_train=6, num_val=3, height=64, width=96, seed=4))
    files_a = digest(a)
    assert len(files_a) == 1 + 2 * (6 + 3) + 4  # params + images/PNGs of both splits + 4 JSON files
    assert files_a == digest(b)
    assert files_a["train/000001.jpg"] != digest(c)["train/000001.jpg"]


def test_meta_has_shape_things_and_texture_stuff():
    meta = synthetic_meta()
    assert meta.num_classes == 10
    assert [meta.class_names[i] for i in meta.thing_classes] == [
        "circle",
        "square",
        "triangle",
        "star",
        "ring",
        "cross",
    ]
    assert sum(not t for t in meta.isthing) == 4 and len(meta.colors) == 10


def test_content_meets_the_spec():
    """Over 60 images: every class appears, 2-4 instances per image, objects from 24 px to 0.6 x the short side
    (sizes are diameters; a rotated or occluded shape can span less), occlusion."""
    cfg = SyntheticConfig(height=128, width=160)
    classes, per_image, sides, visible_fraction = set(), [], [], []
    for index in range(60):
        image, ids, segments = render_image(cfg, np.random.default_rng([0, 0, index]))
        assert image.shape == (128, 160, 3) and image.dtype == np.uint8
        assert set(np.unique(ids)) == {s["id"] for s in segments}  # every pixel labelled, no stale segment
        things = [s for s in segments if s["category_id"] <= 6]
        per_image.append(len(things))
        classes.update(s["category_id"] for s in segments)
        for seg in things:
            rows, cols = np.nonzero(ids == seg["id"])
            sides.append(max(np.ptp(rows) + 1, np.ptp(cols) + 1))
            visible_fraction.append(len(rows) / seg["drawn_area"])
    assert classes == set(range(1, 11))
    assert min(per_image) >= 2 and max(per_image) <= 4 and np.mean(per_image) >= 2.5
    assert min(sides) <= 30 and max(sides) >= 70  # from ~24 px to 0.6 x the 128 px short side (77 px)
    assert min(sides) >= 12
    assert min(visible_fraction) >= 0.5  # occluded, but never more than half hidden
    assert sum(f < 1 for f in visible_fraction) >= 10  # occlusion does happen


def test_stuff_regions_use_distinct_textures():
    cfg = SyntheticConfig()
    regions = []
    for index in range(30):
        _, ids, segments = render_image(cfg, np.random.default_rng([0, 1, index]))
        stuff = [s for s in segments if s["category_id"] > 6]
        assert len({s["category_id"] for s in stuff}) == len(stuff)  # one segment per stuff class
        assert sum(int((ids == s["id"]).sum()) for s in stuff) > 0.4 * ids.size  # background covers the image
        regions.append(len(stuff))
    assert set(regions) == {1, 2, 3}


def test_files_are_valid_coco_panoptic_and_instance(tmp_path):
    root = ensure_synthetic(tmp_path / "s", SMALL)
    pan = json.loads((root / "annotations/panoptic_val.json").read_text())
    inst = json.loads((root / "annotations/instances_val.json").read_text())
    assert [c["id"] for c in pan["categories"]] == list(range(1, 11))
    assert [c["id"] for c in inst["categories"]] == list(range(1, 7))
    ann = pan["annotations"][0]
    ids = read_panoptic_png(root / "panoptic_val" / ann["file_name"])
    assert sorted(np.unique(ids).tolist()) == sorted(s["id"] for s in ann["segments_info"])
    for seg in ann["segments_info"]:
        assert seg["area"] == int((ids == seg["id"]).sum())
    # the instance file holds exactly the panoptic thing segments (visible masks as RLE)
    first = [a for a in inst["annotations"] if a["image_id"] == ann["image_id"]]
    things = [s for s in ann["segments_info"] if s["category_id"] <= 6]
    assert len(first) == len(things)
    for a, s in zip(first, things):
        assert np.array_equal(mask_utils.decode(a["segmentation"]).astype(bool), ids == s["id"])
    assert read_rgb_image(root / "val" / pan["images"][0]["file_name"]).shape == (64, 96, 3)
    # both readers accept the files
    panoptic = CocoPanopticDataset(
        root / "val", root / "panoptic_val", root / "annotations/panoptic_val.json", with_gt=True
    )
    instance = CocoInstanceDataset(root / "val", root / "annotations/instances_val.json", with_gt=True)
    assert panoptic.meta.class_names == synthetic_meta().class_names
    item, inst_item = panoptic[0], instance[0]
    thing_labels = [lbl for lbl in item["labels"].tolist() if lbl < 6]
    assert sorted(thing_labels) == sorted(inst_item["labels"].tolist())
    assert sum(panoptic.issues.counts.values()) == 0


def test_val_split_does_not_depend_on_num_train(tmp_path):
    """The presets train on more images than the default of earlier versions; the val split they are scored on
    must stay the same images (image i of a split is drawn from its own seed)."""
    few = ensure_synthetic(tmp_path / "few", SyntheticConfig(num_train=2, num_val=3, height=64, width=96, seed=3))
    many = ensure_synthetic(tmp_path / "many", SyntheticConfig(num_train=5, num_val=3, height=64, width=96, seed=3))
    val_files = sorted(p.relative_to(few) for p in few.rglob("*") if p.is_file() and "val" in str(p.relative_to(few)))
    assert len(val_files) == 3 + 3 + 2  # images, panoptic PNGs, two annotation files
    for rel in val_files:
        assert (few / rel).read_bytes() == (many / rel).read_bytes(), rel
    train_first = sorted((few / "train").iterdir())[0].name
    assert (few / "train" / train_first).read_bytes() == (many / "train" / train_first).read_bytes()


def test_reuse_regenerate_and_refuse(tmp_path):
    root = ensure_synthetic(tmp_path / "s", SMALL)
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    ensure_synthetic(root, SMALL)  # identical parameters: reused, untouched
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    bigger = SyntheticConfig(num_train=6, num_val=4, height=64, width=96, seed=3)
    ensure_synthetic(root, bigger)  # changed parameters: regenerated in place
    assert len(list((root / "val").glob("*.jpg"))) == 4
    assert json.loads((root / "synthetic.json").read_text())["params"]["num_val"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary or old folders left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a generated synthetic dataset"):
        ensure_synthetic(foreign, SMALL)
    assert (foreign / "photo.jpg").exists()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    original = synthetic._write_split

    def crash_on_val(root, cfg, split, split_index, workers=1):
        if split == "val":
            raise KeyboardInterrupt("simulated interruption")
        return original(root, cfg, split, split_index, workers)

    monkeypatch.setattr(synthetic, "_write_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "s", SMALL)
    assert list(tmp_path.iterdir()) == []  # neither a half dataset nor a temporary folder


def test_datamodule_generates_on_first_use(tmp_path):
    from proscale.data import SyntheticDataModule

    dm = SyntheticDataModule(
        root=tmp_path / "syn", num_train=4, num_val=2, height=64, width=64, batch_size=2, num_workers=0
    )
    assert dm.meta.num_classes == 10  # before any file exists
    assert not (tmp_path / "syn").exists()
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 64, 64)
    for target in batch["targets"]:
        assert target["masks"].shape[1:] == (64, 64) and len(target["labels"]) == len(target["masks"])
        assert target["masks"].flatten(1).any(1).all()  # no empty target masks
    val = next(iter(dm.val_dataloader()))
    assert len(val["gt"]) == 2 and val["gt"][0]["panoptic"].shape == (64, 64)
    # targets cover exactly the labelled pixels (synthetic data has no void)
    assert torch.equal(val["targets"][0]["masks"].sum(0)[:64, :64], torch.ones(64, 64, dtype=torch.long))
    assert math.isclose(len(dm.gt_files("val")), 4)


def test_cache_decoded_gives_the_same_items_without_rereading_files(tmp_path):
    from proscale.data import SyntheticDataModule

    def validation_set(cache: bool):
        dm = SyntheticDataModule(
            root=tmp_path / "syn", num_train=2, num_val=3, height=64, width=64, num_workers=0, cache_decoded=cache
        )
        dm.prepare_data()
        dm.setup("validate")
        return dm.datasets["val"]

    plain, cached = validation_set(False), validation_set(True)
    expected = [plain[i] for i in range(3)]
    first = [cached[i] for i in range(3)]
    first[0]["image"].zero_()  # consumers writing into an item must not reach the cache
    first[0]["gt"]["panoptic"].zero_()
    for folder in ("val", "panoptic_val"):  # from now on only the cache can answer
        for path in (tmp_path / "syn" / folder).iterdir():
            path.unlink()
    with pytest.raises(ValueError, match="000001.jpg: image file is missing"):
        plain[0]
    for i in range(3):
        item = cached[i]
        assert torch.equal(item["image"], expected[i]["image"]) and torch.equal(item["masks"], expected[i]["masks"])
        assert torch.equal(item["labels"], expected[i]["labels"])
        assert torch.equal(item["gt"]["panoptic"], expected[i]["gt"]["panoptic"])
        assert item["gt"]["panoptic"].dtype == expected[i]["gt"]["panoptic"].dtype == torch.int64  # cache holds int32


def test_thing_fills_choose_how_instances_are_filled():
    """``thing_fills=("solid",)``: every instance is one colour plus mild noise; the default mix also draws
    gradients and stripes (a much larger spread inside some instances); an unknown fill is refused by name."""

    def spreads(cfg: SyntheticConfig) -> list[float]:
        out = []
        for index in range(20):
            image, ids, segments = render_image(cfg, np.random.default_rng([0, 0, index]))
            for seg in segments:
                if seg["category_id"] <= 6:
                    mask = ids == seg["id"]
                    if mask.sum() >= 100:
                        out.append(float(image[mask].astype(np.float32).std(axis=0).max()))
        return out

    solid = spreads(SyntheticConfig(thing_fills=("solid",)))
    mixed = spreads(SyntheticConfig(thing_fills=("solid", "gradient", "stripes")))
    assert len(solid) >= 10 and max(solid) < 12  # noise sigma 6 (+ JPEG-free rendering, clipping)
    assert max(mixed) > 15
    with pytest.raises(ValueError, match="thing_fills"):
        SyntheticConfig(thing_fills=("plaid",))


def test_a_killed_generators_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """A SIGKILLed writer cannot clean up; the next ensure_synthetic removes its folder, but never the folder of a
    writer that still runs (this process) or one another host wrote (shared file systems)."""
    import subprocess
    import sys

    from proscale.utils.io import host_temporary_sibling, remove_abandoned_siblings

    root = tmp_path / "synthetic"
    prefix = host_temporary_sibling(root).name.rsplit("-", 2)[0] + "-"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f"{prefix}{int(dead.stdout)}-deadbeef"
    running = tmp_path / f"{prefix}{os.getpid()}-cafef00d"
    other_host = tmp_path / f".synthetic.tmp-some-other-node-{int(dead.stdout)}-0badc0de"
    for folder in (abandoned, running, other_host):
        (folder / "images").mkdir(parents=True)
    assert remove_abandoned_siblings(root) == [abandoned]
    assert not abandoned.exists() and running.exists() and other_host.exists()
    ensure_synthetic(root, SyntheticConfig(num_train=2, num_val=1))
    assert (root / synthetic.PARAMS_FILE).is_file()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".synthetic"))
    assert leftovers == sorted([running.name, other_host.name])
