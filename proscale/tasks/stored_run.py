"""What a checkpoint stores about how its scores were produced, and how ``eval`` / ``predict`` use it.

A training checkpoint's ``hyper_parameters`` hold the model config, the class metadata (``meta``), the inference
settings (``inference``: thresholds, top-k, which tasks) and the test-time transforms (``test_transforms``: Hydra
configs). ``eval`` and ``predict`` take all four from the weights, so one checkpoint gives one result everywhere;
a setting given on the command line wins and is printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from proscale.data.transforms import Compose
from proscale.structures import DatasetMeta
from proscale.utils.checkpoints import resolve_ckpt_path
from proscale.weights import LoadedWeights
from proscale.weights.tasks import read_weights_from_cfg


def weights_path(cfg: DictConfig) -> str:
    """``weights=PATH`` or its alias ``ckpt_path=PATH`` (this project's checkpoints; ``last`` = the newest
    ``last.ckpt`` of the experiment's runs). Exactly one of them, or two equal ones."""
    weights, ckpt_path = cfg.get("weights"), cfg.get("ckpt_path")
    if weights and ckpt_path and str(weights) != str(ckpt_path):
        raise ValueError(f"weights={weights} and ckpt_path={ckpt_path} disagree: pass one of them")
    chosen = weights or ckpt_path
    if not chosen:
        raise ValueError(
            f"{cfg.get('task_name', 'this task')} needs weights: pass weights=/path/to/file.ckpt "
            "(or ckpt_path=..., or ckpt_path=last for the newest run of this experiment)"
        )
    if str(chosen) == "last":
        return str(resolve_ckpt_path("last", cfg.paths.runs_dir))
    if not Path(str(chosen)).exists():
        raise ValueError(f"weights={chosen}: no such file or folder")
    return str(chosen)


def read_weights_of(cfg: DictConfig) -> LoadedWeights:
    """Read the weights the config names, with its ``weights_ema`` / ``allow_unsafe_load`` choices."""
    loaded = read_weights_from_cfg(cfg, weights_path(cfg))
    print(f"weights: {loaded.path} ({loaded.format}{', EMA weights' if loaded.ema else ''})")
    return loaded


def stored_meta(loaded: LoadedWeights) -> DatasetMeta | None:
    return DatasetMeta(**loaded.meta) if loaded.meta else None


def check_meta_matches(loaded: LoadedWeights, meta: DatasetMeta) -> None:
    """The weights' classes must be the dataset's (names, ids, thing/stuff, in order): a clear error otherwise."""
    stored = stored_meta(loaded)
    if stored is None:
        return
    for field in ("class_names", "category_ids", "isthing"):
        ours, theirs = list(getattr(meta, field)), list(getattr(stored, field))
        if ours != theirs:
            differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            stored_value = theirs[differ] if differ < len(theirs) else "-"
            dataset_value = ours[differ] if differ < len(ours) else "-"
            raise ValueError(
                f"weights {loaded.path} were trained on other classes than this dataset's: {field} differ "
                f"({len(theirs)} stored vs {len(ours)} in the dataset; first difference at index {differ}: "
                f"{stored_value!r} vs {dataset_value!r})"
            )


def skip_backbone_pretraining_weights(model_cfg: DictConfig, explicit: Mapping[str, Any]) -> None:
    """Every weight comes from the file: the ImageNet weights the run started from (``backbone.pretrained``, a
    path that may not exist here) are not loaded first, unless the command line names them."""
    if "backbone.pretrained" not in explicit and OmegaConf.select(model_cfg, "backbone.pretrained") is not None:
        OmegaConf.update(model_cfg, "backbone.pretrained", None)


def merged_settings(
    what: str, stored: Mapping[str, Any] | None, configured: Mapping[str, Any], explicit: Mapping[str, Any]
) -> dict[str, Any]:
    """``configured`` with the ``stored`` values replacing it, except the ``explicit`` (command-line) keys, which
    win; prints where each differing value came from."""
    merged = dict(configured)
    for key, value in (stored or {}).items():
        if key in explicit:
            if explicit[key] != value:
                print(f"{what}.{key}: {explicit[key]!r} (command line; the weights store {value!r})")
            continue
        merged[key] = value
    return merged


def build_test_transform(configs: list | None) -> Compose:
    """A ``Compose`` of the stored (or given) test-time transform configs; ``None`` / ``[]`` = none."""
    if not configs:
        return Compose([])
    plain = OmegaConf.to_container(OmegaConf.create(list(configs)), resolve=True)
    return Compose([hydra.utils.instantiate(config) for config in plain])
