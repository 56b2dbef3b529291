"""Loggers record the config the model was actually built with, flattened to searchable keys."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger

from proscale.train import train
from proscale.utils.hydra_utils import compose_config
from proscale.utils.run_info import flatten


def test_flatten_keeps_lists_as_values():
    assert flatten({"a": {"b": 1, "c": {"d": [3, 3, 3]}}, "e": {}}, "cfg") == {
        "cfg/a/b": 1,
        "cfg/a/c/d": [3, 3, 3],
        "cfg/e": {},
    }


def test_wandb_config_equals_the_instantiated_model(tmp_path, monkeypatch):
    """The tiny preset composes model.num_classes 133 from conf/model/mask2former.yaml (or null), while the model is
    built for the synthetic dataset's classes: W&B must log the built value, under a flat key."""
    cfg = compose_config(
        "train",
        [
            "experiment=tiny",
            "steps=1",
            "num_threads=1",
            "logger=wandb",
            "trainer.enable_progress_bar=false",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            "callbacks.compute_stats=null",
        ],
        output_dir=tmp_path / "run",
    )
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
