"""The training task: ``train(cfg)`` fits, tests the best checkpoint and writes ``results.json``.

Everything is built from the composed Hydra config with ``hydra.utils.instantiate``:
``cfg.data`` (a LightningDataModule exposing ``.meta``), ``cfg.model`` (the ``nn.Module``), ``cfg.module``
(:class:`proscale.lightning.module.SegmentationModule` with criterion / inference / evaluators / optimizer /
scheduler as partials), ``cfg.callbacks``, ``cfg.logger`` and ``cfg.trainer``. Entry point: ``scripts/train.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf, open_dict

from proscale.lightning.callbacks import WANDB_RUN_ID_KEY, AtomicCheckpointIO, WandbExtras
from proscale.lightning.interrupt import GracefulInterrupt
from proscale.utils.checkpoints import check_state_dict_fits, load_checkpoint_cpu, resolve_ckpt_path
from proscale.utils.instantiate import instantiate_callbacks, instantiate_loggers
from proscale.utils.io import remove_stale_temporaries
from proscale.utils.logging_utils import get_logger
from proscale.utils.results import COMPUTE_KEYS, headline_metrics, write_results
from proscale.utils.rich_utils import print_metrics_table
from proscale.utils.run_info import hydra_runtime, run_tags, wandb_tag_list
from proscale.utils.task import task_wrapper

log = get_logger(__name__)


def set_num_threads(num_threads: int | None) -> None:
    """Cap torch's intra-op threads (``num_threads``); on a CPU shared with other jobs, 1 thread per process avoids
    the idle spinning of oversubscribed thread pools, which can make small ops 10x slower."""
    if num_threads:
        torch.set_num_threads(int(num_threads))


def build_datamodule_and_module(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate the data module, then the model sized to its classes, then the LightningModule."""
    datamodule = hydra.utils.instantiate(cfg.data)
    meta = getattr(datamodule, "meta", None)
    if meta is None:
        raise ValueError(
            f"data module {type(datamodule).__name__} has no .meta (DatasetMeta); see proscale/structures.py"
        )
    model_cfg = cfg.model.copy()
    configured = model_cfg.get("num_classes")
    if configured is not None and configured != meta.num_classes:
        raise ValueError(
            f"model.num_classes={configured} but the dataset ({type(datamodule).__name__}) has {meta.num_classes} "
            "classes; remove the override (model.num_classes=null takes the dataset's count) or fix the data"
        )
    with open_dict(model_cfg):
        model_cfg.num_classes = meta.num_classes
    model = hydra.utils.instantiate(model_cfg)
    # Built as a partial and then called: Hydra would turn the DatasetMeta dataclass into a config node.
    module_factory = hydra.utils.instantiate(cfg.module, _partial_=True)
    module = module_factory(model=model, meta=meta, model_config=OmegaConf.to_container(model_cfg, resolve=True))
    return datamodule, module


def resume_checkpoint_path(cfg: DictConfig, callbacks: list) -> Path:
    """Where an interrupted run writes its resumable checkpoint: the ``last.ckpt`` that ``ckpt_path=last`` finds."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.filename == "last" and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


class MetricsNotFiniteError(ValueError):
    """Evaluation ran but produced no finite headline metric (e.g. a split without annotations);
    ``results.json`` is already written with ``status: failed`` and the NaN metrics."""

    results_written = True


def metrics_problem(results: dict[str, Any]) -> str | None:
    """Why a finished run must not be reported "ok": every headline metric it evaluated is NaN."""
    main = [results[key] for key in ("PQ", "AP", "mIoU") if results.get(key) is not None]
    if results.get("split") and main and all(math.isnan(value) for value in main):
        return (
            f"every {results['split']} metric is NaN: the {results['split']} split has nothing to score "
            "(no annotated image?)"
        )
    return None


def build_trainer(cfg: DictConfig, wandb_overrides: dict[str, Any], tags: dict[str, Any]) -> L.Trainer:
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    loggers = instantiate_loggers(cfg.get("logger"), wandb_overrides)
    if any("Wandb" in type(lg).__name__ for lg in loggers):
        callbacks.append(WandbExtras(summary={f"tag/{k}": v for k, v in tags.items() if v is not None}))
    callbacks.append(GracefulInterrupt(resume_checkpoint_path(cfg, callbacks)))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])
    run_cfg = {k: v for k, v in cfg.items() if k != "hydra"}  # the hydra node is Hydra's, not the run's
    hparams = {"cfg": OmegaConf.to_container(OmegaConf.create(run_cfg), resolve=True), "tags": tags}
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return trainer


def wandb_settings(cfg: DictConfig, tags: dict[str, Any], checkpoint: dict | None) -> dict[str, Any]:
    """Per-run W&B values: tags, the sweep as ``group``, and the stored run id when resuming."""
    settings: dict[str, Any] = {"tags": wandb_tag_list(tags, [str(t) for t in cfg.get("tags") or []])}
    job = hydra_runtime().get("job")
    if job:
        settings["group"] = f"{cfg.get('experiment_name')}/{Path(job['sweep_dir']).name}"
    if checkpoint is not None and checkpoint.get(WANDB_RUN_ID_KEY):
        settings["id"] = checkpoint[WANDB_RUN_ID_KEY]
        settings["resume"] = "allow"
    return settings


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def collect_results(
    cfg: DictConfig, metrics: dict[str, float], module: Any, tags: dict, wall_time_s: float, best: str | None
) -> dict[str, Any]:
    """The ``results.json`` payload (schema in :mod:`proscale.utils.results`)."""
    info = hydra_runtime()
    split, headline = headline_metrics(metrics)
    stats = getattr(module, "compute_stats", {}) or {}
    return {
        "status": "ok",
        "error": None,
        "task_name": cfg.get("task_name"),
        "experiment": cfg.get("experiment_name"),
        "output_dir": str(cfg.paths.output_dir),
        "overrides": info.get("overrides", []),
        "job": info.get("job"),
        "tags": tags,
        "split": split,
        **headline,
        "metrics": metrics,
        **{key: stats.get(key) for key in COMPUTE_KEYS},
        "nonfinite_skipped": getattr(module, "nonfinite_total", 0),
        "wall_time_s": wall_time_s,
        "best_checkpoint": best,
    }


def finish_run(cfg: DictConfig, trainer: L.Trainer, results: dict[str, Any], title: str) -> None:
    """Rank 0: write results.json atomically, print the metrics table and the file's path."""
    if not trainer.is_global_zero:
        return
    path = write_results(cfg.paths.output_dir, results)
    print_metrics_table(results, title=title)
    print(f"results: {Path(path).resolve()}", flush=True)


def maybe_pretrain_backbone(cfg: DictConfig) -> dict[str, Any] | None:
    """``pretrain=semantic`` (conf/pretrain/): pre-train the backbone on the training split (or reuse the cached
    weights) and point ``model.backbone.pretrained`` at them. Skipped when the backbone already has a
    checkpoint or when resuming (the checkpoint holds every weight). Returns the pre-training info or None."""
    if not cfg.get("pretrain") or cfg.model.backbone.get("pretrained") or cfg.get("ckpt_path"):
        return None
    from proscale.lightning.backbone_pretrain import pretrain_backbone

    path, info = pretrain_backbone(cfg)
    with open_dict(cfg):
        cfg.model.backbone.pretrained = str(path)
    return {**info, "path": str(path)}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (``cfg.train``), test the best checkpoint (``cfg.test``), write ``results.json``.

    Returns ``(metrics, objects)``: every final logged metric as floats, and the built objects
    (``cfg``, ``datamodule``, ``module``, ``trainer``) for tests and notebooks.
    """
    start = time.perf_counter()
    set_num_threads(cfg.get("num_threads"))
    remove_stale_temporaries(cfg.paths.output_dir)
    pretrain_info = maybe_pretrain_backbone(cfg)
    # seeded after the (possibly cached) pre-training, so a run is the same whether it trained it or reused it
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build_datamodule_and_module(cfg)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.runs_dir, cfg.paths.output_dir)
    checkpoint = None
    if ckpt_path is not None:
        checkpoint = load_checkpoint_cpu(ckpt_path)
        check_state_dict_fits(module, checkpoint, ckpt_path)
        log.info(f"resuming from {ckpt_path}")
    tags = run_tags(cfg)
    trainer = build_trainer(cfg, wandb_settings(cfg, tags, checkpoint), tags)
    del checkpoint

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _floats(trainer.callback_metrics)

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
        metrics.update(_floats(trainer.callback_metrics))

    results = collect_results(cfg, metrics, module, tags, time.perf_counter() - start, best)
    results["backbone_pretrain"] = pretrain_info
    problem = metrics_problem(results)
    if problem:
        results.update(status="failed", error=problem)
    finish_run(cfg, trainer, results, title=f"{cfg.get('experiment_name')}: final metrics ({results['split']})")
    if problem:
        raise MetricsNotFiniteError(problem)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "results": results}
