"""The root config keys of the apps (``weights``, ``weights_ema``, ``weights_allow_partial``, ``allow_unsafe_load``)
turned into calls of the weights API, for the train task (eval / predict / export use the same keys)."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from proscale.weights.formats import LoadedWeights, read_weights
from proscale.weights.loading import PARTIAL_OPT_IN
from proscale.weights.resolve import command_line_model_overrides, resolve_model_config


def read_weights_from_cfg(cfg: DictConfig, path: str | None = None) -> LoadedWeights | None:
    """``read_weights(path or cfg.weights, use_ema=cfg.weights_ema, allow_unsafe=cfg.allow_unsafe_load)``; None
    when neither is set. Every app reads its weights through here (eval / predict resolve ``path`` first:
    :func:`proscale.tasks.stored_run.weights_path`)."""
    path = path or cfg.get("weights")
    if path in (None, "", "null"):
        return None
    return read_weights(
        str(path), use_ema=bool(cfg.get("weights_ema", True)), allow_unsafe=bool(cfg.get("allow_unsafe_load", False))
    )


def training_model_config(cfg: DictConfig, loaded: LoadedWeights, num_classes: int) -> DictConfig:
    """The model config to train from ``loaded`` on a dataset of ``num_classes`` classes.

    The file's class count must be the dataset's unless ``weights_allow_partial`` (then the class head starts
    afresh and the derived / stored ``num_classes`` gives way to the dataset's).
    """
    allow_partial = bool(cfg.get("weights_allow_partial", False))
    explicit = command_line_model_overrides()
    explicit.pop("num_classes", None)  # training always takes the dataset's class count
    derived = dict(loaded.derived_overrides or {})
    file_classes = (loaded.model_config or {}).get("num_classes", derived.get("num_classes"))
    if file_classes is not None and file_classes != num_classes:
        if not allow_partial:
            raise ValueError(
                f"weights {loaded.path} have a class head for {file_classes} classes but the dataset has "
                f"{num_classes}: pass {PARTIAL_OPT_IN} to load everything else and train a new class head"
            )
        print(
            f"weights {loaded.path}: class head for {file_classes} classes not loaded (the dataset has {num_classes})"
        )
    derived.pop("num_classes", None)
    return resolve_model_config(cfg.model, dataclasses.replace(loaded, derived_overrides=derived), explicit)


__all__ = ["read_weights_from_cfg", "training_model_config"]
