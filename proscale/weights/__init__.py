"""Weights API (CONTRACT.md): read a weight file, resolve the model config to build, load the weights.

MINIMAL STAND-IN written by the "results" branch: it reads only this project's Lightning checkpoints. The
"weights" branch owns the real implementation (every format) and replaces this file at merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from proscale.utils.hydra_utils import command_line_overrides
from proscale.utils.safe_load import UnsafeFileError, torch_load

MODEL_PREFIX = "model."


@dataclass
class LoadedWeights:
    path: Path
    format: str
    state_dict: dict[str, Tensor]
    model_config: dict | None = None
    derived_overrides: dict[str, Any] = field(default_factory=dict)
    meta: dict | None = None
    inference: dict | None = None
    test_transforms: list | None = None
    ema: bool = False


@dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    reshaped: list[str]


def read_weights(path: str | Path, *, use_ema: bool = True, allow_unsafe: bool = False) -> LoadedWeights:
    """A Lightning checkpoint written by ``scripts/train.py`` -> its model weights (EMA ones when stored and
    ``use_ema``) and what its ``hyper_parameters`` store."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights={path}: no such file")
    try:
        checkpoint = torch_load(path, allow_unsafe=allow_unsafe)
    except UnsafeFileError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read weights {path}: {type(error).__name__}: {error}") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None, dict) or not (
        hparams or {}
    ).get("model_config"):
        raise ValueError(f"{path} is not a checkpoint written by scripts/train.py (no state_dict + model_config)")
    ema_state = checkpoint.get("ema")
    if use_ema and ema_state is not None:
        state_dict = dict(ema_state["shadow"])
    else:
        raw = checkpoint["state_dict"]
        state_dict = {k[len(MODEL_PREFIX) :]: v for k, v in raw.items() if k.startswith(MODEL_PREFIX)}
    return LoadedWeights(
        path=path,
        format="lightning",
        state_dict=state_dict,
        model_config=dict(hparams["model_config"]),
        meta=hparams.get("meta"),
        inference=hparams.get("inference"),
        test_transforms=hparams.get("test_transforms"),
        ema=bool(use_ema and ema_state is not None),
    )


def resolve_model_config(cfg_model: DictConfig, loaded: LoadedWeights, explicit: Mapping[str, Any]) -> DictConfig:
    """The stored model config with the explicit (command-line) overrides applied and printed."""
    if loaded.model_config is None:
        raise ValueError(f"{loaded.path} stores no model config (the stand-in reads only this project's checkpoints)")
    config = OmegaConf.create(loaded.model_config)
    for key, value in explicit.items():
        stored = OmegaConf.select(config, key, default=None)
        OmegaConf.update(config, key, value, force_add=True)
        print(f"model.{key}: {stored!r} (stored in {loaded.path.name}) -> {value!r} (command line)")
    return config


def command_line_model_overrides() -> dict[str, Any]:
    return command_line_overrides("model")


def load_weights_into(model: nn.Module, loaded: LoadedWeights, allow_partial: bool = False) -> LoadReport:
    """Load ``loaded.state_dict`` into ``model``; strict unless ``allow_partial`` (then only the fitting keys)."""
    ours = model.state_dict()
    theirs = loaded.state_dict
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(theirs) if tuple(ours[k].shape) != tuple(theirs[k].shape))
    fitting = {k: v for k, v in theirs.items() if k in ours and k not in reshaped}
    report = LoadReport(sorted(fitting), missing, unexpected, reshaped)
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
        if keys
    ]
    if problems and not allow_partial:
        raise ValueError(f"weights {loaded.path} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(fitting, strict=False)
    which = " (EMA)" if loaded.ema else ""
    print(
        f"loaded {len(fitting)}/{len(ours)} tensors from {loaded.path}{which}"
        + (f"; {'; '.join(problems)}" if problems else "")
    )
    return report
