"""Build callbacks and loggers from their Hydra config groups (``conf/callbacks``, ``conf/logger``)."""

from __future__ import annotations

from typing import Any

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from proscale.utils.logging_utils import get_logger

log = get_logger(__name__)


def _entries(cfg: DictConfig | None, group: str) -> list[tuple[str, DictConfig]]:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"the {group} config must be a mapping of name -> {{_target_: ...}}, got {type(cfg).__name__}")
    return [(name, node) for name, node in cfg.items() if isinstance(node, DictConfig) and "_target_" in node]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """One callback per ``callbacks.<name>`` entry with a ``_target_`` (a ``null`` entry disables it)."""
    callbacks = []
    for name, node in _entries(cfg, "callbacks"):
        log.info(f"callback {name}: <{node._target_}>")
        callbacks.append(hydra.utils.instantiate(node))
    return callbacks


def instantiate_loggers(cfg: DictConfig | None, wandb_overrides: dict[str, Any] | None = None) -> list[Logger]:
    """One logger per ``logger.<name>`` entry. ``wandb_overrides`` (id/resume/group/tags computed by the train
    task) are applied to W&B loggers only, and never replace a value the user set explicitly."""
    loggers = []
    for name, node in _entries(cfg, "logger"):
        if "WandbLogger" in str(node._target_) and wandb_overrides:
            node = node.copy()
            with open_dict(node):
                for key, value in wandb_overrides.items():
                    if node.get(key) in (None, "", []):
                        node[key] = value
        log.info(f"logger {name}: <{node._target_}>")
        loggers.append(hydra.utils.instantiate(node))
    return loggers
