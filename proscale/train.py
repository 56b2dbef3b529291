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
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf, open_dict

from proscale.lightning.callbacks import WANDB_RUN_ID_KEY, AtomicCheckpointIO, WandbExtras
from proscale.lightning.distributed import check_launch, module_config_for_precision, trainer_config_for_launch
from proscale.lightning.interrupt import GracefulInterrupt
from proscale.lightning.prediction_grid import PredictionGrid
from proscale.models.backbone_weights import NOT_SET, pretrained_choice, require_backbone_weights
from proscale.utils.checkpoints import check_state_dict_fits, load_checkpoint_cpu, resolve_ckpt_path
from proscale.utils.instantiate import instantiate_callbacks, instantiate_loggers
from proscale.utils.io import remove_stale_temporaries
from proscale.utils.launch import launch_run_name, own_resume_checkpoint
from proscale.utils.logging_utils import get_logger
from proscale.utils.results import COMPUTE_KEYS, headline_metrics, write_results
from proscale.utils.rich_utils import print_metrics_table
from proscale.utils.run_info import hydra_runtime, logged_hyperparameters, run_tags, wandb_tag_list
from proscale.utils.task import task_wrapper
from proscale.weights import LoadedWeights, load_weights_into
from proscale.weights.tasks import read_weights_from_cfg, training_model_config

log = get_logger(__name__)


def build_datamodule_and_module(
    cfg: DictConfig, weights: LoadedWeights | None = None, load_weights: bool = True
) -> tuple[Any, Any]:
    """Instantiate the data module, then the model sized to its classes, then the LightningModule.

    ``weights`` (:func:`proscale.weights.read_weights`): the model is built for them (stored config, or derived
    overrides) and, when ``load_weights``, initialised from them before the module (and its EMA copy) exists.
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    meta = getattr(datamodule, "meta", None)
    if meta is None:
        raise ValueError(
            f"data module {type(datamodule).__name__} has no .meta (DatasetMeta); see proscale/structures.py"
        )
    if weights is None:
        model_cfg = cfg.model.copy()
        configured = model_cfg.get("num_classes")
        if configured is not None and configured != meta.num_classes:
            raise ValueError(
                f"model.num_classes={configured} but the dataset ({type(datamodule).__name__}) has "
                f"{meta.num_classes} classes; remove the override (model.num_classes=null takes the dataset's count) "
                "or fix the data"
            )
    else:  # the file's class head must fit the dataset unless weights_allow_partial (proscale.weights.tasks)
        model_cfg = training_model_config(cfg, weights, meta.num_classes)
    with open_dict(model_cfg):
        model_cfg.num_classes = meta.num_classes
    model = hydra.utils.instantiate(model_cfg)
    if weights is not None and load_weights:
        load_weights_into(model, weights, allow_partial=bool(cfg.get("weights_allow_partial", False)))
    # Built as a partial and then called: Hydra would turn the DatasetMeta dataclass into a config node.
    module_cfg = module_config_for_precision(cfg.module, cfg.trainer)  # AMP + clipping needs an unfused AdamW
    module_factory = hydra.utils.instantiate(module_cfg, _partial_=True)
    module = module_factory(
        model=model,
        meta=meta,
        model_config=OmegaConf.to_container(model_cfg, resolve=True),
        test_transforms=test_transform_configs(cfg.data, datamodule),
    )
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


def test_transform_configs(cfg_data: DictConfig, datamodule: Any) -> list[dict] | None:
    """The data module's test-time transforms as Hydra configs (plain dicts with ``_target_``), stored in the
    checkpoints so eval / predict transform images as the run's test did. ``data.test_transforms: null`` means
    the family's default recipe: its ``ResizeShortestEdge`` objects are turned back into configs (None, with
    a warning, for any other transform)."""
    configured = cfg_data.get("test_transforms")
    if configured is not None:
        return OmegaConf.to_container(configured, resolve=True)
    configs = []
    for transform in getattr(getattr(datamodule, "test_transform", None), "transforms", []):
        if type(transform).__name__ != "ResizeShortestEdge":
            log.warning(f"test transform {transform!r} has no config: checkpoints will not store the test transforms")
            return None
        edges = transform.short_edges
        configs.append(
            {
                "_target_": "proscale.data.transforms.ResizeShortestEdge",
                "short_edge": edges[0] if len(edges) == 1 else list(edges),
                "max_size": int(transform.max_size),
                "sample_style": transform.sample_style,
            }
        )
    return configs


def build_trainer(
    cfg: DictConfig, wandb_overrides: dict[str, Any], tags: dict[str, Any], model_config: dict | None = None
) -> L.Trainer:
    """The Lightning trainer with the configured callbacks and loggers; the loggers record the run's config
    flattened, with ``model_config`` (what the model was built with) in place of ``cfg.model``."""
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    loggers = instantiate_loggers(cfg.get("logger"), wandb_overrides)
    if any("Wandb" in type(lg).__name__ for lg in loggers):
        callbacks.append(WandbExtras(summary={f"tag/{k}": v for k, v in tags.items() if v is not None}))
    callbacks.append(GracefulInterrupt(resume_checkpoint_path(cfg, callbacks)))
    checkpoint_io = AtomicCheckpointIO(allow_unsafe=bool(cfg.get("allow_unsafe_load", False)))
    trainer_cfg = trainer_config_for_launch(cfg.trainer)  # e.g. sync_batchnorm only on CUDA
    trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, plugins=[checkpoint_io])
    hparams = logged_hyperparameters(cfg, tags, model_config)
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
    """Rank 0: write results.json atomically, print the metrics table, the file's path and the prediction grid's."""
    if not trainer.is_global_zero:
        return
    path = write_results(cfg.paths.output_dir, results)
    print_metrics_table(results, title=title)
    print(f"results: {Path(path).resolve()}", flush=True)
    pictures = [cb.written for cb in trainer.callbacks if isinstance(cb, PredictionGrid) and cb.written is not None]
    for picture in pictures:  # (callbacks.prediction_grid)
        print(f"predictions (validation images, ground truth | prediction): {picture}", flush=True)


def maybe_pretrain_backbone(cfg: DictConfig) -> dict[str, Any] | None:
    """``pretrain=semantic`` (conf/pretrain/): pre-train the backbone on the training split (or reuse the cached
    weights) and point ``model.backbone.pretrained`` at them. Skipped when ``pretrained`` is given (a file,
    ``true`` or ``none``), when ``weights`` initialise the whole model, or when resuming (the checkpoint holds every
    weight). Returns the pre-training info or None."""
    given = pretrained_choice(cfg.model.backbone.get("pretrained")) is not NOT_SET  # a file, true or none
    # `pretrain=none` under a preset that tweaks `pretrain.steps` leaves a node without a `kind`: nothing to run
    enabled = (cfg.get("pretrain") or {}).get("kind") == "semantic"
    if not enabled or given or cfg.get("ckpt_path") or cfg.get("weights"):
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
