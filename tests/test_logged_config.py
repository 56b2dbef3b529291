"""Loggers record the config the model was actually built with, flattened to searchable keys."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger

from proscale.tasks.train import train
from proscale.utils.run_info import flatten


def test_flatten_keeps_lists_as_values():
    assert flatten({"a": {"b": 1, "c": {"d": [3, 3, 3]}}, "e": {}}, "cfg") == {
        "cfg/a/b": 1,
        "cfg/a/c/d": [3, 3, 3],
        "cfg/e": {},
    }


def test_wandb_config_equals_the_instantiated_model(monkeypatch, tiny_wandb_cfg):
    """The tiny preset composes model.num_classes 133 from conf/model/mask2former.yaml (or null), while the model is
    built for the synthetic dataset's classes: W&B must log the built value, under a flat key."""
    cfg = tiny_wandb_cfg(1)
    logged: dict = {}
    original = WandbLogger.log_hyperparams

    def spy(self, params):  # the W&B run's own config after Lightning's update (offline runs keep it in a binary log)
        original(self, params)
        logged.update(dict(self.experiment.config))

    monkeypatch.setattr(WandbLogger, "log_hyperparams", spy)
    _, objects = train(cfg)
    model = objects["module"].model
    assert logged["cfg/model/num_classes"] == model.num_classes == objects["datamodule"].meta.num_classes
    built = flatten(objects["module"].hparams["model_config"], "cfg/model")
    assert {k: logged[k] for k in built} == built
    assert logged["cfg/model/encoder/schedule"] == [3, 3, 3] and logged["tags/encoder"] == "proscale"
