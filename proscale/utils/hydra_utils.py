"""Compose the project's Hydra configs outside a Hydra app (tests, notebooks) the way a run would see them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict

from proscale.cli import CONFIG_DIR


def compose_config(
    config_name: str = "train", overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` and register it as the current Hydra config.

    ``output_dir`` becomes ``hydra.runtime.output_dir`` (so ``${paths.output_dir}`` resolves) and is created.
    The returned config still holds the ``hydra`` node, as inside a Hydra app's job.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(Path(output_dir).resolve())
    HydraConfig.instance().set_config(cfg)
    return cfg


def command_line_overrides(prefix: str) -> dict[str, Any]:
    """``{dotted key below prefix: value}`` of the current Hydra job's command-line overrides under ``prefix``.

    ``prefix="model"`` turns ``model.lpe=false +model.encoder.schedule=[3,3,3]`` into
    ``{"lpe": False, "encoder.schedule": [3, 3, 3]}``; deletions (``~model.x``) map to ``None``. Outside a
    Hydra app (or a :func:`compose_config` call) there are none: ``{}``.
    """
    if not HydraConfig.initialized():
        return {}
    task_overrides = list(HydraConfig.get().overrides.task)
    start = prefix + "."
    found: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(task_overrides):
        key = override.key_or_group
        if key.startswith(start):
            found[key[len(start) :]] = None if override.is_delete() else override.value()
    return found
