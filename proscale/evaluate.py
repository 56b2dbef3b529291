"""The evaluation task: ``evaluate(cfg)`` scores a checkpoint on the test split and writes ``results.json``.

``cfg.ckpt_path`` is required (a file or ``last``). The model is built from ``cfg`` (pass the same
experiment/model overrides as the training run); a checkpoint of another architecture fails with the list of
mismatching keys. Entry point: ``scripts/eval.py``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig

from proscale.train import (
    build_datamodule_and_module,
    build_trainer,
    collect_results,
    finish_run,
    set_num_threads,
    wandb_settings,
)
from proscale.utils.checkpoints import check_state_dict_fits, load_checkpoint_cpu, resolve_ckpt_path
from proscale.utils.run_info import run_tags
from proscale.utils.task import task_wrapper


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Test ``cfg.ckpt_path`` (validation split when the data module has no test split)."""
    start = time.perf_counter()
    set_num_threads(cfg.get("num_threads"))
    if not cfg.get("ckpt_path"):
        raise ValueError("evaluation needs a checkpoint: pass ckpt_path=/path/to/file.ckpt (or ckpt_path=last)")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build_datamodule_and_module(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.runs_dir)
    checkpoint = load_checkpoint_cpu(ckpt_path)
    check_state_dict_fits(module, checkpoint, ckpt_path)
    tags = run_tags(cfg)
    trainer = build_trainer(cfg, wandb_settings(cfg, tags, None), tags)
    del checkpoint
    if is_overridden("test_dataloader", datamodule):
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path)
    else:
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    results = collect_results(cfg, metrics, module, tags, time.perf_counter() - start, ckpt_path)
    finish_run(cfg, trainer, results, title=f"evaluation of {ckpt_path}")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "results": results}
