"""Mask2Former's set criterion: Hungarian matching, then class cross-entropy and point-sampled mask losses.

Keys returned by ``SetCriterion.forward`` (all unweighted scalars)::

    loss_ce, loss_mask, loss_dice                 final prediction
    loss_ce_{i}, loss_mask_{i}, loss_dice_{i}     auxiliary prediction ``outputs["aux_outputs"][i]``

The key set depends only on the number of auxiliary predictions, never on the targets, so every DDP rank
returns the same keys and every loss stays connected to the graph even when a rank has no targets.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from proscale.models.matcher import HungarianMatcher
from proscale.models.point_sampling import point_sample, sample_uncertain_points

_AUX_SUFFIX = re.compile(r"_\d+$")


def sigmoid_bce_loss(point_logits: Tensor, point_labels: Tensor, num_masks: Tensor | float) -> Tensor:
    """Per-mask mean BCE over points, summed over masks, divided by ``num_masks``. Inputs: (M, P) each."""
    per_point = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return per_point.mean(1).sum() / num_masks


def dice_loss(point_logits: Tensor, point_labels: Tensor, num_masks: Tensor | float) -> Tensor:
    """Per-mask ``1 - (2|p*t| + 1) / (|p| + |t| + 1)``, summed over masks, divided by ``num_masks``.

    Inputs: (M, P) logits and (M, P) targets in [0, 1].
    """
    probs = point_logits.sigmoid()
    numerator = 2.0 * (probs * point_labels).sum(-1)
    denominator = probs.sum(-1) + point_labels.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


class SetCriterion(nn.Module):
    """Mask2Former loss with deep supervision.

    Per prediction (final and each auxiliary one): match queries to targets (``matcher``); cross-entropy over
    K+1 classes with the no-object class weighted ``eos_coef``; for matched pairs, sigmoid BCE and dice at
    ``num_points`` points per mask chosen by uncertainty (``oversample_ratio`` x candidates, the
    ``importance_sample_ratio`` most uncertain kept, the rest uniform). Mask losses are divided by
    ``num_masks``: the number of target masks summed over all processes, divided by the world size and clamped
    to >= 1, as the original does. DDP averages gradients over ranks, so the gradient equals that of the
    global batch's mask losses divided by the global mask count.

    ``weight_dict`` holds the weight of each base loss name; ``total_loss`` applies it to auxiliary keys too.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"SetCriterion: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        if oversample_ratio < 1.0:
            raise ValueError(f"SetCriterion: oversample_ratio must be >= 1, got {oversample_ratio}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = eos_coef
        # Not persistent: a constant of the config, not a learned state worth a checkpoint key.
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Compute all unweighted losses.

        Args:
            outputs: ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w), "aux_outputs": [dicts of the two]}``
                (``aux_outputs`` optional).
            targets: B dicts ``{"labels": LongTensor (N_b,), "masks": (N_b, H, W)}`` at the padded input size
                (any H, W: points are sampled in normalized coordinates).

        Returns:
            dict of scalar losses, keys as in the module docstring.
        """
        self._check_inputs(outputs, targets)
        device = outputs["pred_logits"].device
        # Convert the full-resolution target masks to float once, not once per prediction (10 of them).
        targets = [{"labels": t["labels"].to(device), "masks": t["masks"].to(device, torch.float32)} for t in targets]
        num_masks = self.num_masks(targets, device)
        losses = self._losses_of_one_prediction(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_losses = self._losses_of_one_prediction(aux, targets, num_masks)
            losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of ``losses``; ``loss_mask_3`` gets the weight of ``loss_mask``."""
        total = None
        for key, value in losses.items():
            base = _AUX_SUFFIX.sub("", key)
            if base not in self.weight_dict:
                raise ValueError(f"SetCriterion.total_loss: unknown loss key {key!r}; known: {list(self.weight_dict)}")
            term = self.weight_dict[base] * value
            total = term if total is None else total + term
        if total is None:
            raise ValueError("SetCriterion.total_loss: empty loss dict")
        return total

    def num_masks(self, targets: list[dict], device: torch.device) -> Tensor:
        """Mask-loss normalizer: all-reduced target count / world size, clamped >= 1 (a 0-dim float tensor).

        A collective when torch.distributed is initialized: every rank calls it once per forward.
        """
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            world_size = dist.get_world_size()
        return torch.clamp(count / world_size, min=1.0)

    def _losses_of_one_prediction(self, prediction: dict, targets: list[dict], num_masks: Tensor) -> dict[str, Tensor]:
        matches = self.matcher(prediction, targets)
        loss_mask, loss_dice = self._mask_losses(prediction["pred_masks"], targets, matches, num_masks)
        return {
            "loss_ce": self._class_loss(prediction["pred_logits"], targets, matches),
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
        }

    def _class_loss(self, class_logits: Tensor, targets: list[dict], matches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Weighted cross-entropy; unmatched queries are supervised as no-object (index K)."""
        batch_size, num_queries, _ = class_logits.shape
        device = class_logits.device
        target_classes = torch.full((batch_size, num_queries), self.num_classes, dtype=torch.int64, device=device)
        for b, (target, (query_idx, target_idx)) in enumerate(zip(targets, matches)):
            target_classes[b, query_idx.to(device)] = target["labels"].to(device)[target_idx.to(device)]
        return F.cross_entropy(
            class_logits.float().transpose(1, 2), target_classes, weight=self.class_weights.to(device)
        )

    def _mask_losses(
        self, mask_logits: Tensor, targets: list[dict], matches: list[tuple[Tensor, Tensor]], num_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the matched (prediction, target) pairs."""
        device = mask_logits.device
        batch_idx = torch.cat([torch.full_like(query_idx, b) for b, (query_idx, _) in enumerate(matches)]).to(device)
        query_idx = torch.cat([query_idx for query_idx, _ in matches]).to(device)
        matched_logits = mask_logits[batch_idx, query_idx].float()[:, None]  # (M, 1, h, w)
        if matched_logits.shape[0] == 0:
            # No targets on this rank: zero losses that still reach every mask parameter, so DDP sees gradients.
            zero = mask_logits.sum() * 0.0
            return zero, zero
        matched_targets = _stack_matched_masks(targets, matches, device)[:, None]  # (M, 1, H, W) float
        with torch.no_grad():
            coords = sample_uncertain_points(
                matched_logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = point_sample(matched_targets, coords)[:, 0]
        point_logits = point_sample(matched_logits, coords)[:, 0]
        return sigmoid_bce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    def _check_inputs(self, outputs: dict, targets: list[dict]) -> None:
        for key in ("pred_logits", "pred_masks"):
            if key not in outputs:
                raise ValueError(f"SetCriterion: outputs lack key {key!r} (has {sorted(outputs)})")
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if logits.ndim != 3 or logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits must be (B, Q, num_classes+1={self.num_classes + 1}), got {tuple(logits.shape)}"
            )
        if masks.ndim != 4 or masks.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"SetCriterion: pred_masks must be (B, Q, h, w) matching pred_logits, got {tuple(masks.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {logits.shape[0]} images")
        for b, target in enumerate(targets):
            if "labels" not in target or "masks" not in target:
                raise ValueError(f"SetCriterion: targets[{b}] needs keys 'labels' and 'masks', has {sorted(target)}")
            labels, target_masks = target["labels"], target["masks"]
            if labels.ndim != 1 or target_masks.ndim != 3 or target_masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"SetCriterion: targets[{b}] labels (N,) and masks (N, H, W) disagree: "
                    f"{tuple(labels.shape)} vs {tuple(target_masks.shape)}"
                )


def _stack_matched_masks(targets: list[dict], matches: list[tuple[Tensor, Tensor]], device: torch.device) -> Tensor:
    """Matched target masks of all images as one float (M, H, W); images of different sizes are zero-padded.

    Zero padding at the bottom/right changes the normalized position of points only when the sizes differ,
    exactly as the original's padded batch does.
    """
    selected = [t["masks"][target_idx.to(t["masks"].device)] for t, (_, target_idx) in zip(targets, matches)]
    if len({m.shape[-2:] for m in selected}) == 1:  # the usual case: one padded size for the whole batch
        return torch.cat(selected).to(device=device, dtype=torch.float32)
    height = max(m.shape[-2] for m in selected)
    width = max(m.shape[-1] for m in selected)
    stacked = torch.zeros(sum(m.shape[0] for m in selected), height, width, device=device)
    start = 0
    for m in selected:
        stacked[start : start + m.shape[0], : m.shape[-2], : m.shape[-1]] = m.to(device=device, dtype=stacked.dtype)
        start += m.shape[0]
    return stacked
