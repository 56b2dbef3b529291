"""What a run is: its Hydra choices and model settings, as tags for W&B and ``results.json``."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def hydra_runtime() -> dict[str, Any]:
    """Hydra's runtime facts (choices, output dir, job num, sweep dir, mode); empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    info: dict[str, Any] = {
        "choices": dict(hydra_cfg.runtime.choices),
        "output_dir": hydra_cfg.runtime.output_dir,
        "overrides": list(hydra_cfg.overrides.task),
        "mode": str(hydra_cfg.mode),
    }
    if info["mode"].endswith("MULTIRUN"):
        info["job"] = {"num": int(hydra_cfg.job.num), "sweep_dir": hydra_cfg.sweep.dir}
    return info


def _find_key(node: Any, key: str) -> Any:
    """First value of ``key`` anywhere inside a nested config (depth first), else ``None``."""
    if isinstance(node, DictConfig):
        if key in node:
            return node[key]
        children = node.values()
    elif isinstance(node, ListConfig):
        children = node
    else:
        return None
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


def run_tags(cfg: DictConfig) -> dict[str, Any]:
    """``{"encoder", "schedule", "backbone", "lpe", "seed"}`` of the run, from Hydra choices and the model config."""
    choices = hydra_runtime().get("choices", {})
    model = cfg.get("model") or OmegaConf.create({})
    encoder_node = _find_key(model, "encoder")
    encoder = choices.get("model/encoder")
    if encoder is None and isinstance(encoder_node, DictConfig):
        from proscale.models.encoders import encoder_name

        encoder = encoder_name(encoder_node) or str(encoder_node.get("_target_", "?")).rsplit(".", 1)[-1]
    backbone_node = _find_key(model, "backbone")
    backbone = choices.get("model/backbone")
    if backbone is None:
        backbone = backbone_node.get("name", "?") if isinstance(backbone_node, DictConfig) else "?"
    if backbone == "timm" and isinstance(backbone_node, DictConfig) and backbone_node.get("model_name"):
        backbone = str(backbone_node.get("model_name"))  # the generic timm group: name the actual model
    schedule = _find_key(encoder_node, "schedule") if encoder_node is not None else None
    lpe = _find_key(model, "lpe")
    return {
        "encoder": str(encoder),
        "schedule": "-".join(str(int(p)) for p in schedule) if schedule is not None else None,
        "backbone": str(backbone),
        "lpe": bool(lpe) if lpe is not None else False,
        "seed": cfg.get("seed"),
    }


def wandb_tag_list(tags: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    out = [f"encoder:{tags['encoder']}", f"backbone:{tags['backbone']}", f"lpe:{'on' if tags['lpe'] else 'off'}"]
    if tags.get("schedule"):
        out.append(f"schedule:{tags['schedule']}")
    return out + list(extra or [])


def flatten(tree: Any, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2, 3]}`` -> ``{"a/b": 1, "c": [2, 3]}``: nested dicts become searchable keys; lists
    stay values (a schedule ``[3, 3, 3]`` is one setting)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        flat.update(flatten(value, name, sep) if isinstance(value, dict) and value else {name: value})
    return flat


def logged_hyperparameters(cfg: DictConfig, tags: dict[str, Any], model_config: dict | None) -> dict[str, Any]:
    """The run's config as loggers (W&B, CSV, TensorBoard) record it: flattened to ``cfg/model/num_classes``-style
    keys, with the ``model`` node replaced by the config the model was actually built with (the dataset's class
    count, the architecture read off ``weights=``), plus the run's tags under ``tags/``."""
    run_cfg = OmegaConf.to_container(OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}), resolve=True)
    if model_config is not None:
        run_cfg["model"] = model_config
    return {**flatten(run_cfg, "cfg"), **flatten(dict(tags), "tags")}
