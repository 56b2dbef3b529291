"""Compose the project's Hydra configs outside a Hydra app (tests, notebooks) the way a run would see them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
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
