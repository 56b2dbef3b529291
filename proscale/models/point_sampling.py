"""Point sampling for the mask losses (PointRend-style), shared by the matcher and the criterion.

Mask2Former never compares full-resolution masks: it compares predictions and targets at a set of points
given in normalized image coordinates. Because a point ``(x, y)`` in ``[0, 1]^2`` names the same physical
location at any resolution, predictions at 1/4 of the input and targets at the full padded input size are
sampled consistently without resizing either of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``features`` at normalized points (zero outside the map, ``align_corners=False``).

    Args:
        features: (N, C, H, W) maps.
        coords: (N, P, 2) points, ``coords[..., 0]`` = x (width axis), ``coords[..., 1]`` = y, both in [0, 1].

    Returns:
        (N, C, P) sampled values.
    """
    grid = 2.0 * coords.to(features.dtype).unsqueeze(2) - 1.0  # (N, P, 1, 2) in grid_sample's [-1, 1]
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def logit_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a binary logit: ``-|logit|``, largest where the prediction is closest to 0.5."""
    return -logits.abs()


def sample_uncertain_points(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Choose points where each predicted mask is most uncertain, plus uniformly random ones.

    Draws ``int(num_points * oversample_ratio)`` uniform candidates per mask, keeps the
    ``int(importance_sample_ratio * num_points)`` with the smallest ``|logit|`` and fills the rest with fresh
    uniform points. The random draws happen in the same order and with the same shapes as the original
    (detectron2 PointRend ``get_uncertain_point_coords_with_randomness``), so a shared seed gives the same points.

    Args:
        mask_logits: (N, 1, H, W) mask logits.

    Returns:
        (N, num_points, 2) points in [0, 1]^2, ``[..., 0]`` = x.
    """
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_candidates, 2, device=mask_logits.device)
    uncertainty = logit_uncertainty(point_sample(mask_logits, candidates))[:, 0]  # (N, num_candidates)
    num_uncertain = int(importance_sample_ratio * num_points)
    # unsorted: the same set of points (their order does not matter to the losses), ~2x faster on CPU
    most_uncertain = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices  # (N, num_uncertain)
    chosen = candidates.gather(1, most_uncertain.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(num_masks, num_random, 2, device=mask_logits.device)], dim=1)
    return chosen
