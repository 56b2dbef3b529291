"""Which model to build for a weight file: its stored config, or the configured one with the derived overrides.

``explicit`` overrides are the user's ``model.*`` command-line values (:func:`command_line_model_overrides`):
they win over a stored config, and must agree with derived values (a foreign file's architecture is a fact,
not a default). Two derived keys switch a whole node when it is configured otherwise: ``backbone.name``
(a fresh node for that backbone; its ``pretrained`` file is dropped, the weights replace it) and
``encoder.name`` (the registered encoder; the configured keys the new encoder accepts are kept, e.g. ``n_heads``).
An ``encoder._target_`` naming an encoder class (model configs stored before encoders were built by name, or the
header of a file converted then) counts as that class's registered name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from proscale.models.encoders import ENCODER_TARGET, ENCODERS, encoder_name
from proscale.weights.formats import LoadedWeights

BACKBONE_TARGET = "proscale.models.backbones.build_backbone"
# command-line group choices and the model-config key that identifies the chosen node
GROUP_KEYS = {"model/encoder": "encoder.name", "model/backbone": "backbone.name"}
NODE_KEYS = tuple(GROUP_KEYS.values())


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _show(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def command_line_model_overrides() -> dict[str, Any]:
    """``{dotted key relative to cfg.model: value}`` of the ``model.*`` command-line overrides of the running Hydra
    app (``model.num_classes=3`` -> ``{"num_classes": 3}``); empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return {}
    out: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if override.is_delete():
            continue
        if key.startswith("model."):
            out[key[len("model.") :]] = _plain(override.value())
        elif key in GROUP_KEYS:  # a group choice: the key that tells its node apart, read from the group's file
            choice = _group_value(key, str(override.value()))
            if choice is not None:
                out[GROUP_KEYS[key]] = choice
    return out


def _group_value(group: str, name: str) -> Any:
    """``model/encoder=m2f`` -> the ``name`` in conf/model/encoder/m2f.yaml (likewise for backbones)."""
    from proscale.cli import CONFIG_DIR

    path = Path(CONFIG_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    return node.get("name")


def _with_encoder_names(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``encoder._target_=<encoder class>`` (older stored or converted files, explicit overrides) as ``encoder.name``."""
    out = dict(overrides)
    if "encoder._target_" in out:
        target = out.pop("encoder._target_")
        out["encoder.name"] = encoder_name({"_target_": target}) or target
    return out


def _node_value(cfg: DictConfig, key: str) -> Any:
    if key == "encoder.name":
        return encoder_name(cfg.get("encoder"))
    return OmegaConf.select(cfg, key, default=None)


def _switch_encoder(cfg: DictConfig, name: str) -> str | None:
    node = cfg.get("encoder")
    current = encoder_name(node)
    if node is None or current == name:
        return None
    accepted = inspect.signature(ENCODERS.get(name)).parameters
    old = OmegaConf.to_container(node, resolve=False)
    kept = {k: v for k, v in old.items() if k in accepted and k != "name"}
    cfg.encoder = {"_target_": ENCODER_TARGET, "name": name, **kept}
    return f"encoder {current or old.get('_target_')} -> {name}"


def _switch_backbone(cfg: DictConfig, name: str) -> str | None:
    node = cfg.get("backbone")
    if node is None or node.get("name") == name:
        return None
    dropped = (
        f" (pretrained={node.get('pretrained')} dropped: the weights replace it)" if node.get("pretrained") else ""
    )
    cfg.backbone = {"_target_": node.get("_target_", BACKBONE_TARGET), "name": name, "pretrained": None}
    return f"backbone {node.get('name')} -> {name}{dropped}"


def _group_of(key: str) -> str:
    return next(group for group, node_key in GROUP_KEYS.items() if node_key == key)


def _drop_backbone_file(cfg: DictConfig, explicit: Mapping[str, Any], loaded: LoadedWeights) -> None:
    """The weights hold the backbone: a configured ``backbone.pretrained`` file (maybe of another machine) would only
    be read to be overwritten."""
    backbone = cfg.get("backbone")
    if isinstance(backbone, DictConfig) and backbone.get("pretrained") and "backbone.pretrained" not in explicit:
        print(f"model.backbone.pretrained={backbone.pretrained} not loaded: the weights {loaded.path} replace it")
        backbone.pretrained = None


def resolve_model_config(cfg_model: DictConfig, loaded: LoadedWeights, explicit: Mapping[str, Any]) -> DictConfig:
    """The model config to build for ``loaded`` (see the module docstring); prints what it changed.

    Raises ``ValueError`` naming both values when an explicit override contradicts a derived one, or when an
    explicit key belongs to a node the file's architecture replaces and does not have.
    """
    explicit = _with_encoder_names({k: _plain(v) for k, v in explicit.items()})
    if loaded.model_config:
        cfg = OmegaConf.create(loaded.model_config)
        with open_dict(cfg):
            _drop_backbone_file(cfg, explicit, loaded)
            for key, value in explicit.items():
                stored = _node_value(cfg, key)
                if key in NODE_KEYS and not _same(stored, value):
                    raise ValueError(
                        f"{_group_of(key)} on the command line chooses {_show(value)}, but the weights {loaded.path} "
                        f"store a model with {_show(stored)}; drop the override"
                    )
                if not _same(stored, value):
                    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
                    print(
                        f"model.{key}={_show(value)} (command line) instead of {_show(stored)} stored in {loaded.path}"
                    )
        return cfg

    derived = _with_encoder_names({k: _plain(v) for k, v in (loaded.derived_overrides or {}).items()})
    for key, value in derived.items():
        if key in explicit and not _same(explicit[key], value):
            given = (
                f"{_group_of(key)} ({_show(explicit[key])})"
                if key in NODE_KEYS
                else f"model.{key}={_show(explicit[key])}"
            )
            raise ValueError(
                f"{given} on the command line contradicts the weights {loaded.path} "
                f"({loaded.format}), which need "
                + (f"{_group_of(key)}={_show(value)}" if key in NODE_KEYS else f"model.{key}={_show(value)}")
                + "; drop the override or use other weights"
            )
    cfg = cfg_model.copy()
    changes: list[str] = []
    with open_dict(cfg):
        switched = [
            _switch_backbone(cfg, derived["backbone.name"]) if "backbone.name" in derived else None,
            _switch_encoder(cfg, derived["encoder.name"]) if "encoder.name" in derived else None,
        ]
        changes += [s for s in switched if s]
        for key, value in derived.items():
            if key in NODE_KEYS:
                continue
            current = OmegaConf.select(cfg, key, default=None)
            if not _same(current, value):
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
                changes.append(f"{key}={_show(value)} (was {_show(current)})")
        for key, value in explicit.items():  # a switched node lost the user's values: put back those it has
            if key in derived or _same(_node_value(cfg, key), value):
                continue
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if parent and isinstance(node, DictConfig) and key.rsplit(".", 1)[1] not in node:
                raise ValueError(
                    f"model.{key}={_show(value)} on the command line does not apply: the weights {loaded.path} "
                    f"({loaded.format}) hold a model whose model.{parent} has no such key"
                )
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        _drop_backbone_file(cfg, explicit, loaded)
    if changes:
        print(f"model config from the weights {loaded.path} ({loaded.format}): " + "; ".join(changes), flush=True)
    return cfg


__all__ = ["command_line_model_overrides", "resolve_model_config"]
