"""The training task: ``train(cfg)`` fits, tests the best checkpoint and writes ``results.json``.

Everything is built from the composed Hydra config with ``hydra.utils.instantiate``:
``cfg.data`` (a LightningDataModule exposing ``.meta``), ``cfg.model`` (the ``nn.Module``), ``cfg.module``
(:class:`proscale.lightning.module.SegmentationModule` with criterion / inference / evaluators / optimizer /
scheduler as partials), ``cfg.callbacks``, ``cfg.logger`` and ``cfg.trainer``; the pieces are built in
:mod:`proscale.tasks.run`. Entry points: ``scripts/train.py``, ``proscale train``.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig

from proscale.lightning.distributed import check_launch
from proscale.models.backbone_weights import require_backbone_weights
from proscale.tasks.run import (
    MetricsNotFiniteError,
    as_floats,
    build_datamodule_and_module,
    build_trainer,
    collect_results,
    finish_run,
    maybe_pretrain_backbone,
    metrics_problem,
    wandb_settings,
)
from proscale.utils.checkpoints import check_state_dict_fits, load_checkpoint_cpu, resolve_ckpt_path
from proscale.utils.io import remove_stale_temporaries
from proscale.utils.launch import launch_run_name, own_resume_checkpoint
from proscale.utils.logging_utils import get_logger
from proscale.utils.run_info import run_tags
from proscale.utils.task import task_wrapper
from proscale.weights.tasks import read_weights_from_cfg

log = get_logger(__name__)

__all__ = ["MetricsNotFiniteError", "train"]


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (``cfg.train``), test the best checkpoint (``cfg.test``), write ``results.json``.

    Returns ``(metrics, objects)``: every final logged metric as floats, and the built objects
    (``cfg``, ``datamodule``, ``module``, ``trainer``) for tests and notebooks.
    """
    start = time.perf_counter()
    require_backbone_weights(cfg)  # the COCO / ADE20K / Cityscapes presets, before any data is read
    check_launch(cfg)  # trainer.num_nodes / devices vs torchrun's layout, a taken MASTER_PORT: fail before waiting
    remove_stale_temporaries(cfg.paths.output_dir)
    pretrain_info = maybe_pretrain_backbone(cfg)
    # seeded after the (possibly cached) pre-training, so a run is the same whether it trained it or reused it
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.runs_dir, cfg.paths.output_dir)
    if ckpt_path is None and cfg.get("train", True) and launch_run_name(cfg.get("run_id")):
        # torchrun restart / SLURM requeue / same run_id: the run folder is stable, continue from its own checkpoint
        own = own_resume_checkpoint(cfg.paths.output_dir)
        ckpt_path = str(own) if own is not None else None
        if own is not None:
            log.info(f"resuming this run's own checkpoint {own}")
    weights = read_weights_from_cfg(cfg)
    if weights is not None and ckpt_path is not None:
        log.info(f"resuming from {ckpt_path}: weights={weights.path} only sets the model config, not the weights")
    datamodule, module = build_datamodule_and_module(cfg, weights, load_weights=ckpt_path is None)
    del weights

    checkpoint = None
    if ckpt_path is not None:
        checkpoint = load_checkpoint_cpu(ckpt_path, allow_unsafe=bool(cfg.get("allow_unsafe_load", False)))
        check_state_dict_fits(module, checkpoint, ckpt_path)
        log.info(f"resuming from {ckpt_path}")
    tags = run_tags(cfg)
    trainer = build_trainer(cfg, wandb_settings(cfg, tags, checkpoint), tags, module.hparams.get("model_config"))
    del checkpoint

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = as_floats(trainer.callback_metrics)

    best = None
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
        best = trainer.checkpoint_callback.best_model_path
    if cfg.get("test", True) and is_overridden("test_dataloader", datamodule):
        if best is None:
            log.warning(
                "no best checkpoint (no validation ran: the run ended before trainer.check_val_every_n_epoch "
                "epochs?): testing the current weights. To validate at the last step whatever its epoch, set "
                "trainer.check_val_every_n_epoch=null 'trainer.val_check_interval=${steps}' (as cpu_ablation does)"
            )
        trainer.test(module, datamodule=datamodule, ckpt_path=best if cfg.get("train", True) else ckpt_path)
        metrics.update(as_floats(trainer.callback_metrics))

    results = collect_results(cfg, metrics, module, tags, time.perf_counter() - start, best)
    results["backbone_pretrain"] = pretrain_info
    problem = metrics_problem(results)
    if problem:
        results.update(status="failed", error=problem)
    finish_run(cfg, trainer, results, title=f"{cfg.get('experiment_name')}: final metrics ({results['split']})")
    if problem:
        raise MetricsNotFiniteError(problem)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "results": results}
