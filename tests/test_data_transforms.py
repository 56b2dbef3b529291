"""Augmentations keep labels aligned with pixels; the collate normalises, pads and records sizes exactly."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from proscale.data.collate import collate_batch, padded_size
from proscale.data.transforms import (
    ColorAugSSD,
    Compose,
    FixedSizeCrop,
    RandomFlip,
    ResizeScale,
    ResizeShortestEdge,
    Sample,
    resize_nearest,
    scale_list,
)
from proscale.structures import PIXEL_MEAN, PIXEL_STD

COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}


def colored_layout(h: int = 60, w: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric id map of four rectangles and an image whose colour is a function of the id."""
    ids = np.full((h, w), 4, dtype=np.int64)
    ids[5:30, 4:40] = 1
    ids[35:58, 10:25] = 2
    ids[8:50, 55:85] = 3
    image = np.zeros((h, w, 3), dtype=np.uint8)
    for seg_id, color in COLORS.items():
        image[ids == seg_id] = color
    return image, ids


def test_lsj_keeps_masks_aligned_with_the_image():
    torch.manual_seed(0)
    lsj = Compose([RandomFlip(), ResizeScale(0.3, 2.0, 96), FixedSizeCrop(96)])
    flips_seen, checked = set(), 0
    for _ in range(25):
        image, ids = colored_layout()
        sample = lsj(Sample(image=image, maps={"panoptic": ids}, fills={"panoptic": 0}))
        out_ids, out_image = sample.maps["panoptic"], sample.image
        assert out_ids.shape == out_image.shape[:2]
        assert max(out_image.shape[:2]) <= 96 and sample.pad_to == (96, 96)
        if (out_ids == 1).any() and (out_ids == 3).any():  # segment 1 is left of segment 3 unless flipped
            flips_seen.add(bool(np.nonzero(out_ids == 1)[1].mean() > np.nonzero(out_ids == 3)[1].mean()))
        for seg_id, color in COLORS.items():
            mask = out_ids == seg_id
            if mask.sum() < 20:
                continue
            # The most interior pixel of each segment (far from any bilinear blending) has the segment's colour.
            depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(depth.argmax(), depth.shape)
            if depth[y, x] >= 3:
                assert tuple(out_image[y, x]) == color, (seg_id, (y, x))
                checked += 1
                # And the segment's pixels are dominated by its colour (a flipped or shifted mask would fail).
                exact = (out_image[mask] == np.array(color)).all(axis=1).mean()
                assert exact > 0.5, (seg_id, exact)
    assert checked > 40
    assert flips_seen == {True, False}  # flipped and unflipped samples were both checked


def test_flip_moves_image_and_masks_together():
    image, ids = colored_layout()
    sample = RandomFlip(prob=1.0)(Sample(image=image.copy(), maps={"m": ids.copy()}))
    assert np.array_equal(sample.maps["m"], ids[:, ::-1])
    assert np.array_equal(sample.image, image[:, ::-1])
    assert tuple(sample.image[10, 90 - 1 - 10]) == COLORS[1]  # pixel (10, 10) was in segment 1


def test_resize_scale_and_crop_geometry():
    torch.manual_seed(1)
    image, ids = colored_layout(40, 60)
    sample = ResizeScale(1.0, 1.0, (80, 120))(Sample(image=image, maps={"m": ids}))
    assert sample.size == (80, 120)  # exactly 2x: every source pixel becomes a 2x2 block
    assert np.array_equal(sample.maps["m"], np.repeat(np.repeat(ids, 2, 0), 2, 1))
    cropped = FixedSizeCrop((64, 50))(sample)
    assert cropped.size == (64, 50) and cropped.pad_to == (64, 50)
    small = FixedSizeCrop(128)(Sample(image=image, maps={"m": ids}))
    assert small.size == (40, 60) and small.pad_to == (128, 128)  # nothing to crop: padded later by the collate


def test_resize_shortest_edge_sizes():
    assert ResizeShortestEdge.output_size(480, 640, 800, 1333) == (800, 1067)
    assert ResizeShortestEdge.output_size(480, 1280, 800, 1333) == (500, 1333)
    assert ResizeShortestEdge.output_size(1024, 2048, 1024, 4096) == (1024, 2048)
    image, ids = colored_layout(30, 45)
    out = ResizeShortestEdge(60, 1000)(Sample(image=image, maps={"m": ids}))
    assert out.size == (60, 90) and out.maps["m"].shape == (60, 90)
    assert scale_list(512)[0] == 256 and scale_list(512)[-1] == 1024 and len(scale_list(512)) == 16


def test_nearest_resize_never_invents_labels():
    ids = np.arange(35).reshape(5, 7)
    for size in [(3, 4), (11, 13), (5, 7)]:
        out = resize_nearest(ids, size)
        assert out.shape == size and set(out.ravel()) <= set(ids.ravel())
    stack = np.stack([ids, ids + 100])  # (N, H, W) stacks resize together
    assert np.array_equal(resize_nearest(stack, (10, 14))[1], resize_nearest(ids, (10, 14)) + 100)


def _item(h, w, n, pad_to=None, value=0):
    image = torch.full((3, h, w), value, dtype=torch.uint8)
    masks = torch.ones(n, h, w, dtype=torch.bool)
    return {
        "image": image, "pad_to": pad_to, "labels": torch.arange(n), "masks": masks,
        "image_id": h, "file_name": f"{h}.jpg", "orig_size": (2 * h, 2 * w),
    }  # fmt: skip


def test_collate_pads_normalises_and_records_sizes_exactly():
    batch = collate_batch([_item(50, 70, 2, value=10), _item(64, 33, 1, value=200)])
    assert batch["images"].shape == (2, 3, 64, 96)
    assert batch["image_sizes"] == [(50, 70), (64, 33)]
    assert batch["orig_sizes"] == [(100, 140), (128, 66)]
    assert batch["image_ids"] == [50, 64] and batch["file_names"] == ["50.jpg", "64.jpg"]
    for channel in range(3):
        expected = (10 - PIXEL_MEAN[channel]) / PIXEL_STD[channel]
        assert torch.allclose(batch["images"][0, channel, :50, :70], torch.tensor(expected))
    assert (batch["images"][0, :, 50:, :] == 0).all() and (batch["images"][0, :, :, 70:] == 0).all()
    assert (batch["images"][1, :, :, 33:] == 0).all()
    masks = batch["targets"][0]["masks"]
    assert masks.shape == (2, 64, 96) and masks[:, :50, :70].all() and masks.sum() == 2 * 50 * 70
    assert batch["targets"][1]["labels"].tolist() == [0]
    assert "gt" not in batch


def test_collate_honours_pad_to_and_divisibility():
    batch = collate_batch([_item(40, 40, 0, pad_to=(100, 100)), _item(20, 10, 1)])
    assert batch["images"].shape[-2:] == (128, 128)
    assert batch["targets"][0]["masks"].shape == (0, 128, 128)
    assert padded_size([(33, 64)]) == (64, 64) and padded_size([(32, 1)]) == (32, 32)


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        collate_batch([])


# ----------------------------------------------------------------------------------------- colour distortion
def _rgb_sample(seed: int = 0, h: int = 24, w: int = 32) -> Sample:
    gen = np.random.default_rng(seed)
    image = gen.integers(40, 216, size=(h, w, 3), dtype=np.uint8)  # away from 0/255: no clipping below
    ids = gen.integers(0, 5, size=(h, w))
    return Sample(image=image, maps={"ids": ids.copy()}, fills={"ids": 0})


def test_color_aug_ssd_changes_only_the_image_and_each_part_does_what_it_says():
    torch.manual_seed(0)
    identity = ColorAugSSD(0, 1.0, 1.0, 1.0, 1.0, 0)
    sample = _rgb_sample()
    before = sample.image.copy()
    for _ in range(8):  # whatever the coins say, neutral ranges change nothing (HSV round trip within 1 level)
        out = identity(_rgb_sample())
        assert np.abs(out.image.astype(int) - before.astype(int)).max() <= 1
        np.testing.assert_array_equal(out.maps["ids"], _rgb_sample().maps["ids"])

    brightness = ColorAugSSD(32, 1.0, 1.0, 1.0, 1.0, 0)
    shifts = set()
    for _ in range(20):  # one offset for every pixel and channel, within +-32; applied about half the time
        diff = brightness(_rgb_sample()).image.astype(int) - before.astype(int)
        assert np.ptp(diff) <= 2 and abs(int(np.median(diff))) <= 32  # (+-1: HSV round trip and rounding)
        shifts.add(int(np.median(diff)) != 0)
    assert shifts == {True, False}

    hue = ColorAugSSD(0, 1.0, 1.0, 1.0, 1.0, 18)
    changed = 0
    for _ in range(20):  # a hue rotation keeps each pixel's max (V) and max - min (chroma)
        out = hue(_rgb_sample()).image.astype(int)
        src = before.astype(int)
        assert np.abs(out.max(-1) - src.max(-1)).max() <= 1
        assert np.abs(np.ptp(out, -1) - np.ptp(src, -1)).max() <= 2
        changed += int(np.abs(out - src).max() > 1)
    assert 3 <= changed <= 17

    contrast = ColorAugSSD(0, 0.5, 0.5, 1.0, 1.0, 0)
    halved = [contrast(_rgb_sample()).image.astype(int) for _ in range(12)]
    assert any(np.abs(x - np.rint(before * 0.5)).max() <= 1 for x in halved)

    with pytest.raises(ValueError, match="contrast_low <= contrast_high"):
        ColorAugSSD(contrast_low=2.0, contrast_high=1.0)


def test_ade20k_and_cityscapes_recipes_use_the_colour_distortion_and_coco_does_not():
    from proscale.data.datamodule import crop_recipe, lsj_recipe

    assert any(isinstance(t, ColorAugSSD) for t in crop_recipe(512, 512, 2048))
    assert not any(isinstance(t, ColorAugSSD) for t in lsj_recipe())


@pytest.mark.parametrize(
    "data, family",
    [
        ("coco_panoptic", "CocoPanopticDataModule"),
        ("coco_instance", "CocoInstanceDataModule"),
        ("ade20k", "ADE20KSemanticDataModule"),
        ("ade20k_panoptic", "ADE20KPanopticDataModule"),
        ("cityscapes", "CityscapesPanopticDataModule"),
    ],
)
def test_data_configs_build_the_recipe_defined_in_code(data, family, tmp_path):
    """Each paper dataset's training recipe is defined once, in code (lsj_recipe / crop_recipe): the config leaves
    train_transforms null instead of spelling the transforms out again, and the datamodule it builds trains with the
    recipe, transform for transform. A preset's list (e.g. the tiny one's) still replaces it."""
    import hydra

    import proscale.data as data_package
    from proscale.utils.hydra_utils import compose_config

    cfg = compose_config("train", [f"data={data}"], output_dir=tmp_path)
    assert cfg.data.train_transforms is None, "the recipe is spelled out again in the config"
    built = hydra.utils.instantiate(cfg.data).train_transform.transforms
    default = getattr(data_package, family).default_train_transforms(None)

    def described(transforms):
        return [
            (type(t).__name__, {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(t).items()})
            for t in transforms
        ]

    assert described(built) == described(default)
