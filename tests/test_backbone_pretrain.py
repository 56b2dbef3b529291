"""Backbone pre-training (``pretrain=semantic``): semantic targets, the cached checkpoint, loading it through
``model.backbone.pretrained``, and the training task using it. Tiny preset (64 px, resnet10t)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from proscale.lightning.backbone_pretrain import IGNORE_INDEX, BackbonePretrainModule, pretrain_backbone, semantic_map
from proscale.models.backbones import TimmBackbone
from proscale.tasks.train import train
from proscale.utils.hydra_utils import compose_config
from proscale.utils.results import read_results

TINY = ["experiment=tiny", "num_threads=1", "trainer.enable_progress_bar=false", "pretrain=semantic"]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config(
        "train",
        [*TINY, f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}", *overrides],
        output_dir=tmp_path / "run",
    )


def test_semantic_map_labels_pixels_later_segments_win_and_ignores_the_rest():
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[0, :2] = True  # rows 0-1: class 3
    masks[1, 1:3, :2] = True  # overlaps row 1 (cols 0-1): class 7 wins there
    out = semantic_map([{"labels": torch.tensor([3, 7]), "masks": masks}], (4, 5))
    expected = torch.full((1, 4, 5), IGNORE_INDEX)
    expected[0, :2] = 3
    expected[0, 1:3, :2] = 7
    assert torch.equal(out, expected)
    # an image without segments is all ignored; a target smaller than the padded batch leaves padding ignored
    empty = semantic_map(
        [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 5, dtype=torch.bool)}], (6, 5)
    )
    assert (empty == IGNORE_INDEX).all()
    padded = semantic_map([{"labels": torch.tensor([2]), "masks": torch.ones(1, 4, 5, dtype=torch.bool)}], (6, 5))
    assert (padded[0, :4] == 2).all() and (padded[0, 4:] == IGNORE_INDEX).all()


def test_pretrain_writes_a_loadable_cached_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "pretrain.steps=3")
    path, info = pretrain_backbone(cfg)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert info["cached"] is False and info["steps"] == 3 and 0.0 <= info["pixel_accuracy"] <= 1.0
    state = torch.load(path, map_location="cpu")
    assert all(value.is_contiguous() for value in state.values())  # trained channels-last, saved in the usual layout
    fresh = TimmBackbone("resnet10t")
    assert not torch.equal(fresh.body.state_dict()["conv1.0.weight"], state["conv1.0.weight"])  # it trained
    loaded = TimmBackbone("resnet10t", pretrained=str(path))
    for key, value in loaded.body.state_dict().items():
        assert torch.equal(value, state[key]), key

    # same settings: reused, not retrained; other settings: another file
    mtime = path.stat().st_mtime_ns
    again, info2 = pretrain_backbone(_cfg(tmp_path, "pretrain.steps=3"))
    assert again == path and info2["cached"] is True and path.stat().st_mtime_ns == mtime
    other, _ = pretrain_backbone(_cfg(tmp_path, "pretrain.steps=2"))
    assert other != path and other.is_file()


def test_pretrain_batch_size_overrides_the_data_batch_and_names_another_file(tmp_path, monkeypatch):
    """`pretrain.batch_size` sets the pre-training's batch alone (the Mask2Former training keeps data.batch_size);
    null keeps the file names of backbones cached before the option existed."""
    from proscale.lightning import backbone_pretrain

    seen = []
    original = backbone_pretrain._train_loader
    monkeypatch.setattr(backbone_pretrain, "_train_loader", lambda dm: seen.append(dm.batch_size) or original(dm))
    default_cfg = _cfg(tmp_path, "pretrain.steps=1")
    default_path, default_info = pretrain_backbone(default_cfg)
    path, info = pretrain_backbone(_cfg(tmp_path, "pretrain.steps=1", "pretrain.batch_size=3"))
    assert seen == [default_cfg.data.batch_size, 3] and default_cfg.data.batch_size != 3
    assert default_info["batch_size"] == default_cfg.data.batch_size and info["batch_size"] == 3
    assert path != default_path
    unset = _cfg(tmp_path)
    assert unset.pretrain.batch_size is None
    before_the_option = _cfg(tmp_path)
    with open_dict(before_the_option):
        del before_the_option.pretrain["batch_size"]
    assert backbone_pretrain._cache_key(unset) == backbone_pretrain._cache_key(before_the_option)
    with pytest.raises(ValueError, match="pretrain.batch_size"):
        pretrain_backbone(_cfg(tmp_path, "pretrain.steps=1", "pretrain.batch_size=0"))


def test_channels_last_training_step_matches_the_default_layout():
    torch.manual_seed(0)
    module = BackbonePretrainModule(TimmBackbone("resnet10t"), 4, lr=1e-3, weight_decay=0.0, total_steps=1)
    module.log = lambda *args, **kwargs: None  # no trainer here
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :32], masks[1, 32:], masks[2, 10:20, 10:20] = True, True, True
    batch = {"images": torch.randn(2, 3, 64, 64), "targets": [{"labels": torch.tensor([0, 1, 3]), "masks": masks}] * 2}
    reference = module.training_step(batch, 0)
    module.on_fit_start()  # the layout change pre-training runs under
    assert module.backbone.body.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(module.training_step(batch, 0), reference, rtol=1e-5, atol=1e-6)


def test_pretrain_refuses_to_train_in_one_of_several_distributed_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="model.backbone.pretrained"):
        pretrain_backbone(_cfg(tmp_path, "pretrain.steps=1"))


def test_pretrain_rejects_zero_steps(tmp_path):
    with pytest.raises(ValueError, match="pretrain.steps"):
        pretrain_backbone(_cfg(tmp_path, "pretrain.steps=0"))


def test_train_uses_the_pretrained_backbone_and_reports_it(tmp_path):
    cfg = _cfg(tmp_path, "pretrain.steps=2", "steps=1", "test=false")
    _, objects = train(cfg)
    info = read_results(tmp_path / "run")["backbone_pretrain"]
    path = Path(info["path"])
    assert path.is_file() and info["steps"] == 2
    assert objects["cfg"].model.backbone.pretrained == str(path)
    assert json.loads(path.with_suffix(".json").read_text())["steps"] == 2


def test_class_balanced_loss_is_the_mean_of_per_class_means():
    from proscale.lightning.backbone_pretrain import BackbonePretrainModule

    module = BackbonePretrainModule(TimmBackbone("resnet10t"), 3, 1e-3, 0.0, 10, class_balanced=True)
    logits = torch.randn(1, 3, 2, 4)
    labels = torch.tensor([[[0, 0, 0, 0], [0, 0, 2, IGNORE_INDEX]]])  # 6 pixels of class 0, 1 of class 2
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    expected = (per_pixel[labels == 0].mean() + per_pixel[labels == 2].mean()) / 2
    torch.testing.assert_close(module.pixel_loss(logits, labels), expected)
    module.class_balanced = False
    torch.testing.assert_close(module.pixel_loss(logits, labels), per_pixel[labels != IGNORE_INDEX].mean())
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    module.class_balanced = True
    assert module.pixel_loss(logits, all_ignored).item() == 0.0


def test_pretraining_data_is_freed_when_it_returns(tmp_path):
    """The pre-training's datasets (with the decoded-image cache: ~0.65 GB for the default synthetic data) must not
    outlive it: Lightning's trainer and module refer to each other, so without a collection they would stay in
    memory while the main training fills its own cache."""
    import gc

    from proscale.data.coco_panoptic import CocoPanopticDataset

    gc.collect()
    gc.disable()  # no automatic collection may help: only what pretrain_backbone itself frees counts
    try:
        before = {id(o) for o in gc.get_objects() if isinstance(o, CocoPanopticDataset)}
        pretrain_backbone(_cfg(tmp_path, "pretrain.steps=2", "data.cache_decoded=true"))
        alive = sum(isinstance(o, CocoPanopticDataset) and id(o) not in before for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive == 0, f"{alive} pre-training dataset(s) still in memory"


def test_pretrain_none_under_a_preset_that_tweaks_the_steps_runs_nothing(tmp_path):
    """cpu_synthetic sets `pretrain.steps`; with `pretrain=none` that tweak is all the node holds: no pre-training
    (it used to start one and fail on the missing cache folder)."""
    from proscale.tasks.run import maybe_pretrain_backbone
    from proscale.utils.hydra_utils import compose_config

    cfg = compose_config("train", ["experiment=cpu_synthetic", "pretrain=none"], output_dir=tmp_path)
    assert list(cfg.pretrain) == ["steps"] and cfg.pretrain.steps > 0
    assert maybe_pretrain_backbone(cfg) is None
    assert compose_config("train", ["experiment=cpu_synthetic"], output_dir=tmp_path).pretrain.kind == "semantic"
