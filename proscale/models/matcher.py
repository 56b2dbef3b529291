"""Hungarian matching of predicted queries to target segments on point-sampled mask costs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from proscale.models.point_sampling import point_sample


def pairwise_sigmoid_bce(pred_logits: Tensor, target: Tensor) -> Tensor:
    """Mean sigmoid BCE between every prediction and every target.

    Args:
        pred_logits: (Q, P) logits at P points.
        target: (N, P) target values in [0, 1] at the same points.

    Returns:
        (Q, N) cost, ``cost[q, n] = mean_p BCE(pred_logits[q, p], target[n, p])``.
    """
    num_points = pred_logits.shape[1]
    loss_if_positive = F.softplus(-pred_logits)  # BCE against target 1
    loss_if_negative = F.softplus(pred_logits)  # BCE against target 0
    return (loss_if_positive @ target.T + loss_if_negative @ (1.0 - target).T) / num_points


def pairwise_dice(pred_logits: Tensor, target: Tensor) -> Tensor:
    """Dice loss ``1 - (2|p*t| + 1) / (|p| + |t| + 1)`` between every prediction and every target.

    Args:
        pred_logits: (Q, P) logits; target: (N, P) values in [0, 1].

    Returns:
        (Q, N) cost.
    """
    probs = pred_logits.sigmoid()
    numerator = 2.0 * probs @ target.T
    denominator = probs.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target segments per image, minimising

    ``cost_class * (-p[target class]) + cost_mask * BCE + cost_dice * dice``

    with BCE and dice measured at ``num_points`` points drawn uniformly at random, the same points for every
    prediction and target of an image (targets are sampled bilinearly at their own, full, resolution).
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor) -> Tensor:
        """Matching cost of one image.

        Args:
            class_logits: (Q, K+1); mask_logits: (Q, h, w); labels: (N,) in [0, K); masks: (N, H, W) any dtype.

        Returns:
            (Q, N) float32 cost (NaN/inf replaced by the largest float so that they are matched last).
        """
        # One uniform draw per image, also for images without targets, so the random stream does not depend on
        # which images happen to be empty.
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        if labels.shape[0] == 0:
            return mask_logits.new_zeros(mask_logits.shape[0], 0, dtype=torch.float32)
        # The cost is computed in float32 even under mixed precision: sigmoid/softplus sums over 12k points.
        class_cost = -class_logits.float().softmax(-1)[:, labels]
        pred_points = point_sample(mask_logits.float()[:, None], coords.expand(mask_logits.shape[0], -1, -1))[:, 0]
        target_points = point_sample(masks.float()[:, None], coords.expand(masks.shape[0], -1, -1))[:, 0]
        cost = (
            self.cost_class * class_cost
            + self.cost_mask * pairwise_sigmoid_bce(pred_points, target_points)
            + self.cost_dice * pairwise_dice(pred_points, target_points)
        )
        largest = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            outputs: ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)}``.
            targets: B dicts ``{"labels": (N_b,) long, "masks": (N_b, H, W)}``.

        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 CPU tensors, each of length ``min(Q, N_b)``;
            query ``query_idx[j]`` is matched to target ``target_idx[j]``.
        """
        matches = []
        for class_logits, mask_logits, target in zip(outputs["pred_logits"], outputs["pred_masks"], targets):
            cost = self.cost_matrix(class_logits, mask_logits, target["labels"], target["masks"])
            query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
            matches.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return matches
