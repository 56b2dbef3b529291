"""What every task builds a run from: the datamodule, the Lightning module (with weights), the trainer with its
callbacks and loggers, the backbone pre-training, and the results (``results.json``, the final table).

:mod:`proscale.tasks.train` and :mod:`proscale.tasks.eval` compose these; :mod:`proscale.tasks.predict` needs no
trainer and builds its model from the weights alone (:mod:`proscale.tasks.stored_run`).
"""


from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from proscale.lightning.callbacks import WANDB_RUN_ID_KEY, AtomicCheckpointIO, WandbExtras
from proscale.lightning.distributed import module_config_for_precision, trainer_config_for_launch
from proscale.lightning.interrupt import GracefulInterrupt
from proscale.lightning.prediction_grid import PredictionGrid
from proscale.models.backbone_weights import NOT_SET, pretrained_choice
from proscale.utils.instantiate import instantiate_callbacks, instantiate_loggers
from proscale.utils.logging_utils import get_logger
from proscale.utils.results import COMPUTE_KEYS, headline_metrics, write_results
from proscale.utils.rich_utils import print_metrics_table
from proscale.utils.run_info import hydra_runtime, logged_hyperparameters, wandb_tag_list
from proscale.weights import LoadedWeights, load_weights_into
from proscale.weights.tasks import training_model_config

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


def as_floats(metrics: dict[str, Any]) -> dict[str, float]:
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
