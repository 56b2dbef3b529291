"""Pictures a person looks at: GT | prediction rows with names, scores and legend (the run's predictions_val.png,
the W&B validation images, predict's overlays), a message instead of an empty panel, and the callback's skips."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.lightning.callbacks import WandbExtras
from proscale.lightning.prediction_grid import PredictionGrid
from proscale.structures import DatasetMeta
from proscale.utils.io import atomic_write_png
from proscale.utils.visualize import (
    class_color,
    comparison_grid,
    comparison_row,
    comparison_sample,
    draw_labelled_segments,
    labelled_overlay,
    legend_panel,
)

H, W = 128, 160
NAMES = ["circle", "square", "triangle", "sky", "grass"]
META = DatasetMeta(NAMES, [1, 2, 3, 4, 5], [True, True, True, False, False])
BLACK = (0, 0, 0)


def make_sample(predicted: bool = True, seed: int = 0) -> dict:
    """Sky over grass with a circle (GT); the prediction: sky, grass and a triangle where the circle is."""
    image = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    gt = np.ones((H, W), dtype=np.int64)
    gt[64:] = 2
    gt[20:60, 30:80] = 3
    gt_segments = [
        {"id": 1, "category_id": 3, "isthing": False},
        {"id": 2, "category_id": 4, "isthing": False},
        {"id": 3, "category_id": 0, "isthing": True},
    ]
    ids = np.zeros((H, W), dtype=np.int64)
    segments = []
    if predicted:
        ids[:64], ids[64:], ids[20:60, 30:80] = 1, 2, 3
        segments = [
            {"id": 1, "category_id": 3, "isthing": False, "score": 0.91},
            {"id": 2, "category_id": 4, "isthing": False, "score": 0.88},
            {"id": 3, "category_id": 2, "isthing": True, "score": 0.55},
        ]
    return {
        "image": image,
        "file_name": f"{seed:06d}.png",
        "segment_ids": ids,
        "segments": segments,
        "gt_segment_ids": gt,
        "gt_segments": gt_segments,
    }


def has_color(picture: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool((picture == np.array(color, dtype=np.uint8)).all(-1).any())


def test_row_enlarges_small_images_and_shows_image_gt_prediction_legend():
    sample = make_sample()
    row = comparison_row(sample, NAMES, min_side=256)
    # 128x160 -> x2 (nearest): 256 px panels under a title strip; three panels side by side, then the legend
    assert row.shape[0] >= 256 + 12 and row.shape[1] > 3 * 320
    title = row.shape[0] - 256
    image_panel = row[title:, :320]
    np.testing.assert_array_equal(image_panel[::2, ::2], sample["image"])  # the image itself, nearest-enlarged
    np.testing.assert_array_equal(image_panel[1::2, 1::2], sample["image"])
    gt_panel = row[title:, 324 : 324 + 320]
    prediction_panel = row[title:, 648 : 648 + 320]
    # black name boxes on both overlays (names on the GT, names + scores on the prediction)
    assert has_color(gt_panel, BLACK) and has_color(prediction_panel, BLACK)
    # the legend lists the classes of GT and prediction: swatches of circle, triangle, sky and grass, not square
    legend = row[:, 972:]
    for category in (0, 2, 3, 4):
        assert has_color(legend, class_color(category)), NAMES[category]
    assert not has_color(legend, class_color(1))


def test_prediction_text_carries_the_score():
    """The label of a scored segment is wider than the bare class name: the score is written too."""
    sample = make_sample()
    only_triangle = [s for s in sample["segments"] if s["id"] == 3]
    with_score, _ = draw_labelled_segments(sample["image"], sample["segment_ids"], only_triangle, NAMES, min_side=256)
    unscored = [{k: v for k, v in s.items() if k != "score"} for s in only_triangle]
    without, _ = draw_labelled_segments(sample["image"], sample["segment_ids"], unscored, NAMES, min_side=256)

    def label_width(picture: np.ndarray) -> int:
        columns = np.nonzero((picture == 0).all(-1).any(0))[0]
        return int(columns.max() - columns.min())

    assert label_width(with_score) > label_width(without) + 15


def test_empty_prediction_says_so_instead_of_an_empty_panel():
    sample = make_sample(predicted=False)
    overlay, classes = draw_labelled_segments(sample["image"], sample["segment_ids"], [], NAMES, min_side=256)
    assert classes == []
    assert overlay.shape == (256, 320, 3)
    middle = overlay[118:138, 40:280]  # the message box sits in the middle of the panel
    assert (middle == 0).all(-1).mean() > 0.3
    # nothing predicted and nothing in the ground truth: both panels carry a message; the legend says "(no classes)"
    sample["gt_segments"] = []
    row = comparison_row(sample, NAMES, min_side=256)
    assert not any(has_color(row, class_color(c)) for c in range(len(NAMES)))
    assert has_color(legend_panel([], NAMES, None, 100), BLACK)


def test_grid_of_four_is_cheap_and_written_atomically(tmp_path):
    samples = [make_sample(predicted=i != 1, seed=i) for i in range(4)]
    start = time.perf_counter()
    grid = comparison_grid(samples, NAMES, min_side=256)
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"{seconds:.2f} s for four 128x160 rows"
    rows = [comparison_row(s, NAMES, min_side=256) for s in samples]
    assert grid.shape[0] == sum(r.shape[0] for r in rows) + 3 * 8
    path = atomic_write_png(tmp_path / "run" / "predictions_val.png", grid)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions_val.png"]  # no temporary left over
    empty = comparison_grid([], NAMES)
    assert empty.shape == (256, 768, 3) and has_color(empty, BLACK)


def test_predict_overlay_keeps_its_layout():
    sample = make_sample()
    overlay = labelled_overlay(sample["image"], sample["segment_ids"], sample["segments"], NAMES, min_side=320)
    assert overlay.shape[0] == 384 and overlay.shape[1] > 480  # 128x160 x3, plus the legend on the right
    assert has_color(overlay[:, 480:], class_color(2))


def test_comparison_sample_from_an_evaluation_batch():
    image = torch.zeros(1, 3, 64, 64)
    gt_ids = torch.zeros(48, 64, dtype=torch.long)
    gt_ids[10:20, 10:20] = 7
    batch = {
        "images": image,
        "image_sizes": [(48, 64)],
        "orig_sizes": [(48, 64)],
        "file_names": ["a.png"],
        "gt": [{"panoptic": gt_ids, "segments": [{"id": 7, "category": 1, "iscrowd": 0, "area": 100}]}],
    }
    prediction = {"panoptic_seg": (torch.zeros(48, 64, dtype=torch.long), [])}
    sample = comparison_sample(batch, 0, prediction, META.isthing)
    assert sample["image"].shape == (48, 64, 3) and sample["segment_ids"].shape == (48, 64)
    assert sample["gt_segments"] == [{"id": 7, "category_id": 1, "isthing": True}]
    assert int(sample["gt_segment_ids"][15, 15]) == 7
    del batch["gt"][0]["panoptic"]  # instance-only ground truth
    assert comparison_sample(batch, 0, prediction, META.isthing)["gt_segment_ids"] is None


# ------------------------------------------------------------------------------------------------ W&B images
class FakeWandbLogger:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append({"key": key, "images": images, "step": step, **kwargs})


def test_wandb_logs_gt_beside_prediction_at_a_legible_size():
    logger = FakeWandbLogger()
    samples = [make_sample(seed=0), make_sample(predicted=False, seed=1)]
    WandbExtras(num_images=4).log_validation_images([logger], samples, META, step=7)
    (call,) = logger.calls
    assert call["key"] == "val/predictions" and call["step"] == 7 and call["caption"] == ["000000.png", "000001.png"]
    first = call["images"][0]
    assert first.shape[0] >= 256 and first.shape[1] > 3 * 320  # not the old 64 px overlays: three big panels
    np.testing.assert_array_equal(first, comparison_row(samples[0], NAMES, META.colors, 256))
    WandbExtras().log_validation_images([logger], [], META, step=8)
    assert len(logger.calls) == 1  # nothing to log, no empty image


# ------------------------------------------------------------------------------------------------ the callback
class FakeModel(torch.nn.Module):
    num_classes = 5

    def forward(self, images):
        return {"images": images}


def fake_module(panoptic: bool = True) -> SimpleNamespace:
    def inference(outputs, image_sizes, orig_sizes):
        ids = torch.ones(*orig_sizes[0], dtype=torch.long)
        out = {"instances": {}}
        if panoptic:
            out["panoptic_seg"] = (ids, [{"id": 1, "category_id": 3, "isthing": False, "score": 0.9}])
        return [out] * len(image_sizes)

    model = FakeModel()
    return SimpleNamespace(
        model=model,
        inference=inference,
        meta=META,
        ema=None,
        device=torch.device("cpu"),
        training=False,
        eval=lambda: None,
        train=lambda mode=True: None,
    )


def loader(with_panoptic_gt: bool, batches: int = 3):
    gt = {"segments": [{"id": 1, "category": 3, "iscrowd": 0, "area": 64 * 64}]}
    if with_panoptic_gt:
        gt["panoptic"] = torch.ones(64, 64, dtype=torch.long)
    batch = {
        "images": torch.zeros(2, 3, 64, 64),
        "image_sizes": [(64, 64)] * 2,
        "orig_sizes": [(64, 64)] * 2,
        "file_names": ["a.png", "b.png"],
        "gt": [gt, gt],
    }
    return [batch] * batches


def fake_trainer(data_loader, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=rank_zero, datamodule=SimpleNamespace(val_dataloader=lambda: data_loader))


def test_callback_writes_num_images_rows(tmp_path):
    callback = PredictionGrid(num_images=3, path=str(tmp_path / "predictions_val.png"))
    callback.on_test_end(fake_trainer(loader(True)), fake_module())
    assert callback.written == (tmp_path / "predictions_val.png").resolve()
    picture = np.asarray(Image.open(callback.written))
    row = comparison_row(
        comparison_sample(loader(True)[0], 0, fake_module().inference(0, [(64, 64)], [(64, 64)])[0]), NAMES
    )
    assert picture.shape[0] == 3 * row.shape[0] + 2 * 8  # three rows (the 2nd batch's first image ends it)


@pytest.mark.parametrize(
    "trainer_kwargs, module_kwargs, why",
    [
        ({"data_loader": loader(False)}, {}, "instance-only ground truth"),
        ({"data_loader": loader(True)}, {"panoptic": False}, "no panoptic prediction"),
        ({"data_loader": loader(True), "rank_zero": False}, {}, "not rank 0"),
    ],
)
def test_callback_skips_without_writing(tmp_path, trainer_kwargs, module_kwargs, why):
    callback = PredictionGrid(path=str(tmp_path / "predictions_val.png"))
    callback.on_fit_end(fake_trainer(**trainer_kwargs), fake_module(**module_kwargs))
    assert callback.written is None and not (tmp_path / "predictions_val.png").exists(), why


def test_callback_refuses_zero_images():
    with pytest.raises(ValueError, match="num_images"):
        PredictionGrid(num_images=0)


# ------------------------------------------------------------------------------------------------ a real run
def test_train_ends_with_the_picture_and_logs_the_rows_to_wandb(tmp_path, monkeypatch, capsys, tiny_wandb_cfg):
    """tiny preset, 4 steps (one epoch, one validation), W&B offline: predictions_val.png under the run folder,
    its path printed; the W&B validation images are the same GT | prediction rows."""
    from lightning.pytorch.loggers import WandbLogger

    from proscale.tasks.train import train

    logged: list[dict] = []
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None, **kw: logged.append(
        {"key": key, "images": images, **kw}
    ))  # fmt: skip
    run_dir = tmp_path / "run"
    train(tiny_wandb_cfg(4, "callbacks.prediction_grid.num_images=3"))
    picture = run_dir / "predictions_val.png"
    assert f"predictions (validation images, ground truth | prediction): {picture.resolve()}" in capsys.readouterr().out
    rows = np.asarray(Image.open(picture))
    # tiny: 64x64 images, enlarged x4 to 256 px panels; three rows of image | GT | prediction | legend
    assert rows.shape[0] > 3 * 256 and rows.shape[1] > 3 * 256
    (call,) = [c for c in logged if c["key"] == "val/predictions"]
    assert len(call["images"]) == 2  # module.num_vis_samples of the tiny preset
    assert all(image.shape[0] > 256 and image.shape[1] > 3 * 256 for image in call["images"])
    assert call["caption"] == ["000001.jpg", "000002.jpg"]


def test_the_picture_can_be_turned_off(tmp_path):
    from proscale.utils.hydra_utils import compose_config
    from proscale.utils.instantiate import instantiate_callbacks

    on = compose_config("train", ["experiment=tiny"], output_dir=tmp_path)
    off = compose_config("train", ["experiment=tiny", "callbacks.prediction_grid=null"], output_dir=tmp_path)
    (grid,) = [cb for cb in instantiate_callbacks(on.callbacks) if isinstance(cb, PredictionGrid)]
    assert grid.path == tmp_path / "predictions_val.png" and grid.num_images == 4
    assert not [cb for cb in instantiate_callbacks(off.callbacks) if isinstance(cb, PredictionGrid)]


def test_a_label_at_the_border_stays_whole_inside_the_panel():
    image = np.full((64, 64, 3), 100, dtype=np.uint8)
    segments = [{"id": 1, "category_id": 0, "score": 0.5}]

    def label_box(first_column: int) -> tuple[int, int]:
        """First and last column of the black label box of a 2-column segment starting at ``first_column``."""
        ids = np.zeros((64, 64), dtype=np.int64)
        ids[:, first_column : first_column + 2] = 1
        overlay, _ = draw_labelled_segments(image, ids, segments, NAMES, min_side=256)
        columns = np.nonzero((overlay == 0).all(-1).any(0))[0]
        return int(columns.min()), int(columns.max())

    left, right = label_box(0)
    middle_left, middle_right = label_box(31)
    # on the left border the label is shifted right, whole: as wide as in the middle, starting at column 0
    assert left == 0 and right - left == middle_right - middle_left > 40


def test_panel_titles_count_the_drawn_segments_in_singular_and_plural():
    from proscale.utils.visualize import _segment_count

    ids = np.zeros((4, 4), dtype=np.int64)
    ids[0, 0], ids[1, 1] = 1, 2
    assert _segment_count(ids, [{"id": 1}]) == "1 segment"
    assert _segment_count(ids, [{"id": 1}, {"id": 2}]) == "2 segments"
    # a segment without a pixel in the map is not drawn, so it is not counted
    assert _segment_count(ids, [{"id": 1}, {"id": 7}]) == "1 segment"
    assert _segment_count(ids, []) == "0 segments"
