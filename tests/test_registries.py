"""Encoders and backbones are built the same way: by name from a registry, and each config-group file is the entry
of the same name (``_target_`` the registry's builder, ``name`` the file's name). Older stored configs that name
the encoder class still resolve to its registered name."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from proscale.cli import CONFIG_DIR
from proscale.models import BACKBONES
from proscale.models.encoders import ENCODER_TARGET, ENCODERS, encoder_name
from proscale.utils.hydra_utils import compose_config

GROUPS = {
    "model/encoder": (ENCODERS, ENCODER_TARGET),
    "model/backbone": (BACKBONES, "proscale.models.backbones.build_backbone"),
}


@pytest.mark.parametrize("group", GROUPS)
def test_registry_and_config_group_list_the_same_names(group):
    registry, builder = GROUPS[group]
    files = sorted(Path(CONFIG_DIR, group).glob("*.yaml"))
    assert {f.stem for f in files} == set(registry.names()), f"conf/{group}/ and the registry disagree"
    for file in files:
        node = OmegaConf.load(file)
        assert node._target_ == builder, f"{file.name}: built by {node._target_}, not the registry's {builder}"
        assert node.name == file.stem, f"{file.name}: name {node.name!r} is not the file's"


def test_encoder_name_reads_new_and_stored_configs():
    assert encoder_name({"_target_": ENCODER_TARGET, "name": "proscale"}) == "proscale"
    assert encoder_name({"_target_": "proscale.models.encoders.M2FEncoder", "d_model": 8}) == "m2f"
    assert encoder_name({"_target_": "proscale.models.encoders.proscale.ProScaleEncoder"}) == "proscale"
    assert encoder_name({"_target_": "somewhere.Else"}) is None and encoder_name(None) is None


def test_config_check_looks_through_the_builder(tmp_path):
    from proscale.utils.config_check import config_problems

    cfg = compose_config("train", ["experiment=tiny", "+model.encoder.num_layer=2"], output_dir=tmp_path)
    problems = [p for p in config_problems(cfg) if p.startswith("model.encoder")]
    assert len(problems) == 1, problems
    assert "proscale (ProScaleEncoder) does not take num_layer" in problems[0] and "schedule" in problems[0]
    cfg = compose_config("train", ["experiment=tiny", "model.encoder.n_heads=two"], output_dir=tmp_path)
    assert any("model.encoder.n_heads='two'" in p and "expected int" in p for p in config_problems(cfg))


def test_stored_class_target_resolves_like_a_name():
    """A checkpoint's model config from before (``_target_: ...ProScaleEncoder``, no ``name``) against the command
    line's ``model/encoder`` choice: the same encoder passes, another is refused naming both."""
    from proscale.weights import LoadedWeights, resolve_model_config

    stored = {
        "_target_": "proscale.models.mask2former.Mask2Former",
        "encoder": {"_target_": "proscale.models.encoders.ProScaleEncoder", "d_model": 8, "schedule": [1, 1, 1]},
        "num_classes": 3,
    }
    loaded = LoadedWeights(Path("old.ckpt"), "lightning", {}, model_config=stored)
    cfg = resolve_model_config(OmegaConf.create({}), loaded, {"encoder.name": "proscale"})
    assert cfg.encoder.schedule == [1, 1, 1]
    with pytest.raises(ValueError, match=r"model/encoder on the command line chooses m2f.*store a model with proscale"):
        resolve_model_config(OmegaConf.create({}), loaded, {"encoder.name": "m2f"})
