"""Dense semantic pre-training of the backbone: the stand-in for ImageNet weights when none are on disk.

Every paper config starts Mask2Former from an ImageNet-pretrained backbone; a randomly initialised one makes
the set-prediction training far slower (the class loss sits at chance level for hundreds of steps). Where no
pretrained checkpoint can be had (no network here), ``pretrain=semantic`` first trains the backbone alone on
the *training split* of the configured dataset as per-pixel classification: a 1x1 classifier on each of the
four feature levels (res2..res5), cross-entropy against the semantic map of the panoptic targets (ignored
where no segment is), summed over levels. The backbone weights are then saved and loaded through the normal
``model.backbone.pretrained=<file>`` path, so the Mask2Former training that follows is unchanged. The
pre-training runs channels-last (faster convolutions on CPU and GPU); the saved weights are contiguous.

The checkpoint is cached under ``pretrain.cache_dir``, named by a hash of everything that determines it
(backbone, data, this config, seed): a second run with the same settings reuses it. It is written atomically
with a JSON sidecar (settings, final pixel accuracy, wall time); a file lock makes a second process that needs the
same backbone at the same time wait for it instead of training it twice. Validation images are never seen.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from proscale.lightning.optim import fused_adamw_supported
from proscale.utils.io import atomic_torch_save, atomic_write_json, exclusive_lock
from proscale.utils.logging_utils import get_logger

log = get_logger(__name__)

IGNORE_INDEX = 255
CACHE_VERSION = 1


def semantic_map(targets: list[dict[str, Tensor]], size: tuple[int, int]) -> Tensor:
    """Per-image panoptic targets (``labels`` (N,), ``masks`` (N, H, W) bool) -> (B, H, W) long class map,
    ``IGNORE_INDEX`` where no segment is (later segments win where masks overlap, as in a panoptic PNG)."""
    out = torch.full((len(targets), *size), IGNORE_INDEX, dtype=torch.long)
    for i, target in enumerate(targets):
        masks, labels = target["masks"], target["labels"]
        if masks.numel() == 0:
            continue
        height, width = masks.shape[-2:]
        for label, mask in zip(labels.tolist(), masks):
            out[i, :height, :width][mask.cpu()] = int(label)
    return out


class BackbonePretrainModule(L.LightningModule):
    """Backbone + one 1x1 classifier per feature level, trained with per-pixel cross-entropy.

    Args:
        backbone: a :class:`~proscale.models.backbones.TimmBackbone` (``out_channels`` {"res2".."res5": C}).
        num_classes: classes of the dataset (labels 0..K-1; ``IGNORE_INDEX`` ignored).
        lr, weight_decay: AdamW; the learning rate follows a one-cycle schedule (5 % warm-up, cosine decay).
        total_steps: optimizer steps of the schedule.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        lr: float,
        weight_decay: float,
        total_steps: int,
        class_balanced: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({name: nn.Conv2d(c, num_classes, 1) for name, c in backbone.out_channels.items()})
        self.num_classes = num_classes
        self.lr, self.weight_decay, self.total_steps = lr, weight_decay, total_steps
        self.class_balanced = class_balanced
        self.pixel_accuracy = float("nan")

    def pixel_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of (B, K, h, w) logits against (B, h, w) labels: the mean over labelled pixels, or with
        ``class_balanced`` the mean over the classes present of each class's mean (a class covering 2 % of the
        pixels, e.g. a small shape, then counts as much as a background texture covering 60 %)."""
        if not self.class_balanced:
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").flatten()
        flat = labels.flatten()
        valid = flat != IGNORE_INDEX
        if not valid.any():
            return logits.sum() * 0.0
        per_pixel, flat = per_pixel[valid], flat[valid]
        sums = per_pixel.new_zeros(self.num_classes).index_add(0, flat, per_pixel)
        counts = torch.bincount(flat, minlength=self.num_classes)
        present = counts > 0
        return (sums[present] / counts[present]).mean()

    def on_fit_start(self) -> None:
        # channels-last convolutions: ~20 % faster backbone steps on CPU (oneDNN), the layout cuDNN prefers
        self.to(memory_format=torch.channels_last)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["images"].contiguous(memory_format=torch.channels_last)
        labels = semantic_map(batch["targets"], tuple(images.shape[-2:])).to(images.device)
        features = self.backbone(images)
        loss = images.new_zeros(())
        for name, feature in features.items():
            logits = self.heads[name](feature)
            level_labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
            loss = loss + self.pixel_loss(logits, level_labels)
            if name == "res3":  # stride 8: the finest level the transformer decoder attends to
                valid = level_labels != IGNORE_INDEX
                correct = ((logits.detach().argmax(1) == level_labels) & valid).sum()
                accuracy = correct.float() / valid.sum().clamp(min=1)
                self.log("pretrain/pixel_acc", accuracy, prog_bar=True, batch_size=images.shape[0])
                self.pixel_accuracy = float(accuracy)
        self.log("pretrain/loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        step = self.global_step + 1
        if step % max(1, self.total_steps // 10) == 0 or step == self.total_steps:  # for logs without a live bar
            log.info(
                f"backbone pre-training: step {step}/{self.total_steps}, loss {loss.item():.3f}, "
                f"res3 pixel accuracy {self.pixel_accuracy:.3f}"
            )
        return loss

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        fused = fused_adamw_supported(params) or None
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        # 5 % warm-up; at least 2 warm-up steps and 4 in all, or OneCycleLR divides by a zero-length phase (a
        # 20-step smoke run failed with ZeroDivisionError); unchanged from 40 steps on
        total = max(self.total_steps, 4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=total, pct_start=min(0.5, max(0.05, 2.0 / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def pretrain_seed(cfg: DictConfig) -> int | None:
    """The pre-training's seed: ``pretrain.seed`` when set (an ablation's seeds then share one backbone, as the
    paper's runs share one ImageNet checkpoint), else the run's ``seed``."""
    chosen = cfg.pretrain.get("seed")
    return cfg.get("seed") if chosen is None else int(chosen)


def _cache_key(cfg: DictConfig) -> str:
    """Hash of what determines the pretrained weights (backbone, data, pretraining settings, seed)."""
    relevant = {
        "version": CACHE_VERSION,
        "backbone": OmegaConf.to_container(cfg.model.backbone, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "pretrain": {
            k: v
            for k, v in OmegaConf.to_container(cfg.pretrain, resolve=True).items()
            if k not in ("cache_dir", "kind", "seed")
        },
        "seed": pretrain_seed(cfg),
    }
    # do not change the weights
    for drop in ("pretrained", "allow_unsafe_load", "num_workers", "eval_batch_size", "cache_decoded"):
        relevant["backbone"].pop(drop, None)
        relevant["data"].pop(drop, None)
    relevant["data"].pop("root", None)
    if relevant["pretrain"].get("batch_size") is None:  # null = data.batch_size (hashed with data): names unchanged
        relevant["pretrain"].pop("batch_size", None)
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def pretrain_backbone(cfg: DictConfig) -> tuple[Path, dict[str, Any]]:
    """Return ``(checkpoint path, info)`` of the backbone pre-trained as ``cfg.pretrain`` says; trains it
    (in this process, on ``cfg.trainer.accelerator``) unless the cache already holds it.

    ``cfg.pretrain``: ``steps``, ``batch_size`` (null = ``cfg.data.batch_size``), ``lr``, ``weight_decay``, ``class_balanced``, ``cache_dir``, ``seed`` (null = the
    run's seed).
    """
    settings = cfg.pretrain
    steps = int(settings.steps)
    if steps < 1:
        raise ValueError(f"pretrain.steps must be >= 1, got {settings.steps}")
    name = f"{cfg.model.backbone.get('model_name', cfg.model.backbone.get('name', 'backbone'))}-{_cache_key(cfg)}"
    path = Path(str(settings.cache_dir)) / f"{name}.pt"
    # two processes needing the same backbone (parallel sweep lanes): the second waits, then reuses the first's
    with exclusive_lock(path.with_suffix(".lock")):
        return _pretrain_or_reuse(cfg, path, steps)


def _pretrain_or_reuse(cfg: DictConfig, path: Path, steps: int) -> tuple[Path, dict[str, Any]]:
    settings = cfg.pretrain
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        log.info(
            f"backbone pre-training: reusing {path} (pixel accuracy {info.get('pixel_accuracy', float('nan')):.3f})"
        )
        return path, {**info, "cached": True}
    if _world_size_from_env() > 1:
        raise RuntimeError(
            f"pretrain: no cached backbone at {path}, and this is one of several distributed processes. Pre-train it "
            "once in a single process first (the same command on one device, or `train=false test=false`), "
            "or pass a checkpoint with model.backbone.pretrained=/path/to/file"
        )
    start = time.perf_counter()
    seed = pretrain_seed(cfg)
    if seed is not None:
        L.seed_everything(seed, workers=True, verbose=False)
    data_cfg = cfg.data
    batch_size = settings.get("batch_size")
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ValueError(f"pretrain.batch_size must be >= 1 or null (= data.batch_size), got {batch_size}")
        data_cfg = OmegaConf.merge(cfg.data, {"batch_size": int(batch_size)})
    datamodule = hydra.utils.instantiate(data_cfg)
    num_classes = datamodule.meta.num_classes
    backbone_cfg = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    backbone_cfg["pretrained"] = None
    backbone = hydra.utils.instantiate(backbone_cfg)
    module = BackbonePretrainModule(
        backbone,
        num_classes,
        float(settings.lr),
        float(settings.weight_decay),
        steps,
        class_balanced=bool(settings.get("class_balanced", False)),
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        precision=cfg.trainer.get("precision", 32),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(path.parent),
    )
    log.info(f"backbone pre-training: {steps} steps of per-pixel classification on the training split -> {path}")
    trainer.fit(module, train_dataloaders=_train_loader(datamodule))
    info = {
        "backbone": backbone_cfg,
        "steps": steps,
        "batch_size": datamodule.batch_size,
        "lr": float(settings.lr),
        "class_balanced": module.class_balanced,
        "pixel_accuracy": module.pixel_accuracy,
        "wall_time_s": time.perf_counter() - start,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.body.state_dict().items()}  # standard layout
    atomic_torch_save(state, path)
    atomic_write_json(sidecar, info)
    log.info(
        f"backbone pre-training: done in {info['wall_time_s']:.0f} s, res3 pixel accuracy {module.pixel_accuracy:.3f}"
    )
    # The trainer and the module refer to each other: collect them now, so that the datasets (and their decoded-
    # image cache) are freed before the main training fills its own.
    del trainer, module, backbone, datamodule, state
    gc.collect()
    return path, {**info, "cached": False}


def _train_loader(datamodule: Any) -> Any:
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.train_dataloader()


__all__ = ["BackbonePretrainModule", "pretrain_backbone", "semantic_map"]
