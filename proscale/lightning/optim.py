"""Optimizer and learning-rate schedules of Mask2Former's recipe.

- :func:`param_groups`: AdamW groups with the backbone's lr scaled (x0.1 in the paper) and no weight decay on
  normalization layers and embeddings (detectron2's ``WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0``).
- :func:`build_adamw`: the optimizer itself (Hydra builds it as a ``_partial_`` and the module passes the model).
- :class:`WarmupSchedule`: a per-step multiplier = linear warm-up x (multi-step or poly decay), used with
  ``LambdaLR``. Milestones may be fractions of the total number of optimizer steps so one config serves any
  training length (the paper's 327,778 / 355,092 of 368,750 are 0.8889 / 0.9630).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
# Parameters that are embeddings although not held by an nn.Embedding (learned level/position tables).
EMBEDDING_NAME_SUFFIXES = ("level_embed", "pos_embed", "absolute_pos_embed", "relative_position_bias_table")
PAPER_MILESTONES = (327_778 / 368_750, 355_092 / 368_750)


def _is_norm(module: nn.Module) -> bool:
    # timm and torchvision define their own norm classes (e.g. LayerNorm2d, FrozenBatchNorm2d); their names say so.
    name = type(module).__name__.lower()
    return isinstance(module, NORM_TYPES) or "norm" in name


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_multiplier: float = 0.1,
    norm_weight_decay: float = 0.0,
    embedding_weight_decay: float = 0.0,
    backbone_prefix: str = "backbone",
) -> list[dict]:
    """Split trainable parameters into AdamW groups by (lr, weight decay).

    Returns a list of dicts ``{"params": [...], "lr", "weight_decay", "name"}`` (``name`` e.g. ``backbone/no_decay``),
    one per distinct (part, decay) pair; frozen parameters are left out. Every trainable parameter is in exactly
    one group (shared parameters are counted once).
    """
    groups: dict[tuple[str, str], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_backbone = module_name == backbone_prefix or module_name.startswith(backbone_prefix + ".")
            if _is_norm(module):
                kind, decay = "norm", norm_weight_decay
            elif isinstance(module, nn.Embedding) or param_name.endswith(EMBEDDING_NAME_SUFFIXES):
                kind, decay = "embedding", embedding_weight_decay
            else:
                kind, decay = "decay", weight_decay
            part = "backbone" if in_backbone else "head"
            group_lr = lr * backbone_lr_multiplier if in_backbone else lr
            key = (part, kind)
            if key not in groups:
                groups[key] = {"params": [], "lr": group_lr, "weight_decay": decay, "name": f"{part}/{kind}"}
            groups[key]["params"].append(param)
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters")
    return list(groups.values())


def fused_adamw_supported(params: Sequence[nn.Parameter]) -> bool:
    """Whether torch's fused (single-kernel) AdamW can take ``params``: floating-point CPU or CUDA tensors."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_adamw(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    backbone_lr_multiplier: float = 0.1,
    norm_weight_decay: float = 0.0,
    embedding_weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> Optimizer:
    """AdamW over :func:`param_groups` (defaults = the paper's recipe).

    ``fused``: torch's single-kernel AdamW (same update rule; ~4x faster than the per-parameter loop on CPU for
    this project's models). None = fused whenever every parameter is a floating-point CPU or CUDA tensor.
    """
    if lr <= 0:
        raise ValueError(f"optimizer lr must be > 0, got {lr}")
    groups = param_groups(model, lr, weight_decay, backbone_lr_multiplier, norm_weight_decay, embedding_weight_decay)
    if fused is None:
        fused = fused_adamw_supported([p for group in groups for p in group["params"]])
    return AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused or None)


class WarmupSchedule:
    """lr multiplier at optimizer step ``t``: ``warmup(t) * decay(t)``.

    Args:
        total_steps: number of optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        kind: ``"multistep"`` (x ``gamma`` at each milestone, the COCO recipe), ``"poly"``
            (``(1 - t / total_steps) ** power``, the Cityscapes/ADE20K recipe) or ``"constant"``.
        milestones: steps of the multi-step decay; values in (0, 1) are fractions of ``total_steps``.
        warmup_steps: linear warm-up length; the multiplier rises from ``warmup_factor`` to 1.
    """

    KINDS = ("multistep", "poly", "constant")

    def __init__(
        self,
        total_steps: int,
        kind: str = "multistep",
        milestones: Iterable[float] = PAPER_MILESTONES,
        gamma: float = 0.1,
        power: float = 0.9,
        warmup_steps: int = 0,
        warmup_factor: float = 1.0,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown lr schedule {kind!r}; valid choices: {list(self.KINDS)}")
        if total_steps < 1:
            raise ValueError(f"lr schedule needs total_steps >= 1, got {total_steps}")
        self.total_steps = int(total_steps)
        self.kind = kind
        self.milestones = sorted(int(round(m * total_steps)) if 0 < m < 1 else int(m) for m in milestones)
        self.gamma = gamma
        self.power = power
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = warmup_factor

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        alpha = step / self.warmup_steps
        return self.warmup_factor * (1 - alpha) + alpha

    def decay(self, step: int) -> float:
        if self.kind == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "poly":
            return max(0.0, 1.0 - min(step, self.total_steps) / self.total_steps) ** self.power
        return 1.0

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.decay(step)


def build_scheduler(optimizer: Optimizer, total_steps: int, **schedule_kwargs) -> LambdaLR:
    """``LambdaLR`` stepping once per optimizer step with a :class:`WarmupSchedule` (state is checkpointable)."""
    return LambdaLR(optimizer, WarmupSchedule(total_steps, **schedule_kwargs))
