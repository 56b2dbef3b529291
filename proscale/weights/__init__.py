"""Minimal stand-in of the weights API (see CONTRACT.md): this project's Lightning checkpoints only.

The "weights" branch replaces this file at merge with the full implementation (every weight format).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from proscale.utils.safe_load import torch_load


@dataclass
class LoadedWeights:
    path: Path
    format: str
    state_dict: dict[str, Tensor]
    model_config: dict | None
    derived_overrides: dict[str, Any] = field(default_factory=dict)
    meta: dict | None = None
    inference: dict | None = None
    test_transforms: list | None = None
    ema: bool = False


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]
    reshaped: list[str]


def read_weights(path, *, use_ema: bool = True, allow_unsafe: bool = False) -> LoadedWeights:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights={path}: no such file")
    try:
        checkpoint = torch_load(path, allow_unsafe=allow_unsafe)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read weights {path}: {type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint of this project (no 'state_dict')")
    hparams = checkpoint.get("hyper_parameters") or {}
    ema = bool(use_ema and checkpoint.get("ema"))
    if ema:
        state = dict(checkpoint["ema"]["shadow"])
    else:
        state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    return LoadedWeights(
        path=path,
        format="lightning",
        state_dict=state,
        model_config=hparams.get("model_config"),
        meta=hparams.get("meta"),
        inference=hparams.get("inference"),
        test_transforms=hparams.get("test_transforms"),
        ema=ema,
    )


def resolve_model_config(cfg_model: DictConfig, loaded: LoadedWeights, explicit: Mapping[str, Any]) -> DictConfig:
    base = OmegaConf.create(loaded.model_config) if loaded.model_config is not None else cfg_model.copy()
    if loaded.model_config is None:
        for key, value in loaded.derived_overrides.items():
            OmegaConf.update(base, key, value, merge=False)
    for key, value in explicit.items():
        print(f"model override from the command line: {key}={value}")
        OmegaConf.update(base, key, value, merge=False)
    return base


def command_line_model_overrides() -> dict[str, Any]:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return {}
    result = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("model."):
            result[key[len("model.") :]] = OmegaConf.create({"v": value}).v if value else value
    return result


def load_weights_into(model: nn.Module, loaded: LoadedWeights, allow_partial: bool = False) -> LoadReport:
    ours = model.state_dict()
    theirs = loaded.state_dict
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(theirs) if tuple(ours[k].shape) != tuple(theirs[k].shape))
    if (missing or unexpected or reshaped) and not allow_partial:
        raise ValueError(
            f"weights {loaded.path} do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"reshaped {reshaped[:10]}"
        )
    fitting = {k: v for k, v in theirs.items() if k in ours and k not in reshaped}
    model.load_state_dict(fitting, strict=False)
    print(f"loaded {len(fitting)} tensors from {loaded.path} ({loaded.format}{', EMA' if loaded.ema else ''})")
    return LoadReport(missing, unexpected, reshaped)


__all__ = [
    "LoadReport",
    "LoadedWeights",
    "command_line_model_overrides",
    "load_weights_into",
    "read_weights",
    "resolve_model_config",
]
