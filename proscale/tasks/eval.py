"""The evaluation task: ``evaluate(cfg)`` scores weights on the test split and writes ``results.json``.

``weights=PATH`` (or its alias ``ckpt_path=PATH`` / ``ckpt_path=last``) is required. What the weights store
decides how they are scored (:mod:`proscale.tasks.stored_run`): the model is built from the stored model config, the
stored inference settings (``module.inference.*``) and test-time transforms (``data.test_transforms``) replace the
configured ones, and the EMA weights are evaluated when the run evaluated with them (``weights_ema=false``: the
raw ones). What is given on the command line (``model.*``, ``module.inference.*``, ``data.test_transforms``)
wins and is printed. The dataset comes from the config (``data=...``) and must have the weights' classes.
Entry point: ``scripts/eval.py``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf, open_dict

from proscale.tasks.run import (
    build_datamodule_and_module,
    build_trainer,
    collect_results,
    finish_run,
    wandb_settings,
)
from proscale.tasks.stored_run import (
    check_meta_matches,
    merged_settings,
    read_weights_of,
    skip_backbone_pretraining_weights,
)
from proscale.utils.hydra_utils import command_line_overrides
from proscale.utils.run_info import run_tags
from proscale.utils.task import task_wrapper
from proscale.weights import LoadedWeights, command_line_model_overrides, load_weights_into, resolve_model_config


def apply_stored_settings(cfg: DictConfig, loaded: LoadedWeights) -> None:
    """Put the weights' model config, inference settings and test-time transforms into ``cfg`` (command-line
    values win). EMA is switched off: the chosen weights (EMA or raw) are loaded into the model itself."""
    explicit = command_line_model_overrides()
    model_cfg = resolve_model_config(cfg.model, loaded, explicit)
    skip_backbone_pretraining_weights(model_cfg, explicit)
    inference = merged_settings(
        "module.inference",
        loaded.inference,
        OmegaConf.to_container(cfg.module.inference, resolve=True),
        command_line_overrides("module.inference"),
    )
    with open_dict(cfg):
        cfg.model = model_cfg
        cfg.module.inference = inference
        cfg.module.ema_decay = None
        if loaded.test_transforms is not None:
            if "test_transforms" in command_line_overrides("data"):
                print(f"data.test_transforms: command line (the weights store {loaded.test_transforms})")
            else:
                cfg.data.test_transforms = loaded.test_transforms
    settings = {k: v for k, v in inference.items() if not k.startswith("_")}
    transforms = cfg.data.get("test_transforms")
    transforms = "the dataset's default" if transforms is None else OmegaConf.to_container(transforms, resolve=True)
    print(f"inference settings: {settings}; test transforms: {transforms}")


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Test the weights (validation split when the data module has no test split)."""
    start = time.perf_counter()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    loaded = read_weights_of(cfg)
    apply_stored_settings(cfg, loaded)
    datamodule, module = build_datamodule_and_module(cfg)
    check_meta_matches(loaded, datamodule.meta)
    load_weights_into(module.model, loaded, allow_partial=bool(cfg.get("weights_allow_partial", False)))
    path = str(loaded.path)
    del loaded
    tags = run_tags(cfg)
    trainer = build_trainer(cfg, wandb_settings(cfg, tags, None), tags, module.hparams.get("model_config"))
    if is_overridden("test_dataloader", datamodule):
        trainer.test(module, datamodule=datamodule)
    else:
        trainer.validate(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    results = collect_results(cfg, metrics, module, tags, time.perf_counter() - start, path)
    finish_run(cfg, trainer, results, title=f"evaluation of {path}")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "results": results}
