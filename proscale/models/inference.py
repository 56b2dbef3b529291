"""Mask2Former post-processing: semantic, panoptic and instance results at each image's original size.

Output per image (see ``proscale/structures.py``, "Inference output"); only the enabled tasks are present::

    {"sem_seg":      FloatTensor (K, h0, w0) per-class scores,
     "panoptic_seg": (LongTensor (h0, w0) segment ids, 0 = void,
                      list[{"id": int >= 1, "category_id": int (contiguous), "isthing": bool,
                            "score": float, "area": int}]),
     "instances":    {"masks": BoolTensor (N, h0, w0), "scores": FloatTensor (N,), "labels": LongTensor (N,)}}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_STRIDE = 4  # pred_masks are at 1/4 of the padded input


def masks_to_original_size(
    mask_logits: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int], orig_size: tuple[int, int]
) -> Tensor:
    """Mask logits of one image at its original size, as the original does it.

    Upsample bilinearly to the padded input size, crop the valid (un-padded) top-left region, then resize
    bilinearly to the size the image had on disk (``align_corners=False`` throughout).

    Args:
        mask_logits: (Q, h, w) logits at 1/4 of the padded input.
        padded_size: (H, W) of the padded input batch.
        image_size: (h_valid, w_valid) region of the padded input that holds the (resized) image.
        orig_size: (h0, w0) output size.

    Returns:
        (Q, h0, w0) float32 logits.
    """
    logits = F.interpolate(mask_logits.float()[None], size=padded_size, mode="bilinear", align_corners=False)
    logits = logits[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(logits, size=orig_size, mode="bilinear", align_corners=False)[0]


class Mask2FormerInference(nn.Module):
    """Turn model outputs into semantic / panoptic / instance predictions, following the original procedure.

    Args:
        num_classes: K, the number of real classes (the model predicts K+1 with no-object last).
        thing_classes: contiguous ids of thing classes. ``None`` means every class is a thing: panoptic stuff
            merging never happens and instance results may have any class.
        object_mask_threshold: panoptic keeps a query only if its best class probability is strictly above this.
        overlap_threshold: panoptic drops a segment whose visible area is below this fraction of its own mask.
        topk_per_image: instance results keep this many highest-scoring (query, class) pairs (before the thing
            filter, as the original).
        semantic_on, instance_on, panoptic_on: which results to compute.
    """

    def __init__(
        self,
        num_classes: int,
        thing_classes: list[int] | None = None,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        topk_per_image: int = 100,
        semantic_on: bool = True,
        instance_on: bool = True,
        panoptic_on: bool = True,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"Mask2FormerInference: num_classes must be >= 1, got {num_classes}")
        if thing_classes is not None and any(not 0 <= c < num_classes for c in thing_classes):
            raise ValueError(f"Mask2FormerInference: thing_classes {list(thing_classes)} outside [0, {num_classes})")
        if topk_per_image < 1:
            raise ValueError(f"Mask2FormerInference: topk_per_image must be >= 1, got {topk_per_image}")
        self.num_classes = num_classes
        self.thing_classes = None if thing_classes is None else sorted(set(int(c) for c in thing_classes))
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.topk_per_image = topk_per_image
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        is_thing = torch.ones(num_classes, dtype=torch.bool)
        if self.thing_classes is not None:
            is_thing[:] = False
            is_thing[self.thing_classes] = True
        self.register_buffer("is_thing", is_thing, persistent=False)

    @torch.no_grad()
    def forward(
        self, outputs: dict, image_sizes: list[tuple[int, int]], orig_sizes: list[tuple[int, int]]
    ) -> list[dict]:
        """Post-process a batch.

        Args:
            outputs: ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4)}`` (other keys ignored).
            image_sizes: B valid regions (h, w) inside the padded (H, W) input.
            orig_sizes: B output sizes (h0, w0).

        Returns:
            B dicts as in the module docstring.
        """
        class_logits, mask_logits = outputs["pred_logits"], outputs["pred_masks"]
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        orig_sizes = [(int(h), int(w)) for h, w in orig_sizes]
        self._check_inputs(class_logits, mask_logits, image_sizes, orig_sizes)
        padded_size = (mask_logits.shape[-2] * MASK_STRIDE, mask_logits.shape[-1] * MASK_STRIDE)
        results = []
        for cls, masks, image_size, orig_size in zip(class_logits, mask_logits, image_sizes, orig_sizes):
            masks = masks_to_original_size(masks, padded_size, image_size, orig_size)
            cls = cls.float()
            result = {}
            if self.semantic_on:
                result["sem_seg"] = self.semantic(cls, masks)
            if self.panoptic_on:
                result["panoptic_seg"] = self.panoptic(cls, masks)
            if self.instance_on:
                result["instances"] = self.instance(cls, masks)
            results.append(result)
        return results

    @staticmethod
    def semantic(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """(Q, K+1) class logits, (Q, h, w) mask logits -> (K, h, w) scores ``sum_q p(c|q) sigmoid(m_q)``."""
        class_probs = class_logits.softmax(-1)[:, :-1]
        return torch.einsum("qc,qhw->chw", class_probs, mask_logits.sigmoid())

    def panoptic(self, class_logits: Tensor, mask_logits: Tensor) -> tuple[Tensor, list[dict]]:
        """Panoptic segmentation of one image.

        Queries whose best class is a real class with probability > ``object_mask_threshold`` compete for each
        pixel by ``prob * sigmoid(mask)``. A query's segment is its won pixels where its own mask is >= 0.5; it
        is kept if non-empty and at least ``overlap_threshold`` of its mask (pixels with sigmoid >= 0.5) is
        won. Stuff segments of one class merge into the first one's id (its score is that first query's).
        Ids count up from 1 in query order; 0 is void.

        Args:
            class_logits: (Q, K+1); mask_logits: (Q, h, w).

        Returns:
            (LongTensor (h, w) segment ids, segments_info list of
            ``{"id", "category_id", "isthing", "score", "area"}``).
        """
        height, width = mask_logits.shape[-2:]
        scores, classes = class_logits.softmax(-1).max(-1)
        keep = (classes != self.num_classes) & (scores > self.object_mask_threshold)
        kept_scores, kept_classes, kept_masks = scores[keep], classes[keep], mask_logits[keep].sigmoid()
        panoptic_map = torch.zeros(height, width, dtype=torch.long, device=mask_logits.device)
        num_kept = kept_scores.shape[0]
        if num_kept == 0:
            return panoptic_map, []
        winner = (kept_scores[:, None, None] * kept_masks).argmax(0)  # (h, w) index into kept queries
        winner_is_confident = kept_masks.gather(0, winner[None])[0] >= 0.5
        won_area = torch.bincount(winner.flatten(), minlength=num_kept)
        own_area = (kept_masks >= 0.5).flatten(1).sum(1)
        visible_area = torch.bincount(winner[winner_is_confident], minlength=num_kept)
        # Decide per kept query (a loop over queries, never over pixels) which segment id it paints.
        won_area, own_area, visible_area = won_area.tolist(), own_area.tolist(), visible_area.tolist()
        kept_classes_list, kept_scores_list = kept_classes.tolist(), kept_scores.tolist()
        is_thing = self.is_thing.tolist()
        segment_of_query = [0] * num_kept
        stuff_segment_of_class: dict[int, int] = {}
        segments: list[dict] = []
        for k in range(num_kept):
            if won_area[k] == 0 or own_area[k] == 0 or visible_area[k] == 0:
                continue
            if won_area[k] / own_area[k] < self.overlap_threshold:
                continue
            category = kept_classes_list[k]
            if not is_thing[category] and category in stuff_segment_of_class:
                segment_of_query[k] = stuff_segment_of_class[category]
                continue
            segment_id = len(segments) + 1
            if not is_thing[category]:
                stuff_segment_of_class[category] = segment_id
            segment_of_query[k] = segment_id
            segments.append(
                {"id": segment_id, "category_id": category, "isthing": is_thing[category], "score": kept_scores_list[k]}
            )
        lookup = torch.tensor(segment_of_query, dtype=torch.long, device=mask_logits.device)
        panoptic_map = lookup[winner] * winner_is_confident
        areas = torch.bincount(panoptic_map.flatten(), minlength=len(segments) + 1).tolist()
        for segment in segments:
            segment["area"] = areas[segment["id"]]
        return panoptic_map, segments

    def instance(self, class_logits: Tensor, mask_logits: Tensor) -> dict[str, Tensor]:
        """Instance results of one image.

        The ``topk_per_image`` best (query, class) pairs by class probability (no-object excluded), then only
        thing classes when ``thing_classes`` is set; mask = logits > 0; score = class probability * mean
        sigmoid inside the mask. Sorted by score, highest first.

        Args:
            class_logits: (Q, K+1); mask_logits: (Q, h, w).

        Returns:
            ``{"masks": BoolTensor (N, h, w), "scores": (N,), "labels": LongTensor (N,)}``.
        """
        num_queries = class_logits.shape[0]
        class_probs = class_logits.softmax(-1)[:, :-1].flatten()  # index = query * K + class
        k = min(self.topk_per_image, num_queries * self.num_classes)
        class_scores, pair_idx = class_probs.topk(k)
        labels = pair_idx % self.num_classes
        query_idx = pair_idx // self.num_classes
        if self.thing_classes is not None:
            thing = self.is_thing.to(labels.device)[labels]
            class_scores, labels, query_idx = class_scores[thing], labels[thing], query_idx[thing]
        logits = mask_logits[query_idx]
        masks = logits > 0
        inside = masks.flatten(1).float()
        mask_scores = (logits.sigmoid().flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
        scores = class_scores * mask_scores
        order = scores.argsort(descending=True, stable=True)
        return {"masks": masks[order], "scores": scores[order], "labels": labels[order]}

    def _check_inputs(
        self, class_logits: Tensor, mask_logits: Tensor, image_sizes: list[tuple[int, int]], orig_sizes: list
    ) -> None:
        if class_logits.ndim != 3 or class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"Mask2FormerInference: pred_logits must be (B, Q, num_classes+1={self.num_classes + 1}), "
                f"got {tuple(class_logits.shape)}"
            )
        if mask_logits.ndim != 4 or mask_logits.shape[:2] != class_logits.shape[:2]:
            raise ValueError(
                f"Mask2FormerInference: pred_masks must be (B, Q, h, w) matching pred_logits, got {tuple(mask_logits.shape)}"
            )
        batch_size = class_logits.shape[0]
        if len(image_sizes) != batch_size or len(orig_sizes) != batch_size:
            raise ValueError(
                f"Mask2FormerInference: {len(image_sizes)} image_sizes and {len(orig_sizes)} orig_sizes "
                f"for a batch of {batch_size}"
            )
        padded_h, padded_w = mask_logits.shape[-2] * MASK_STRIDE, mask_logits.shape[-1] * MASK_STRIDE
        for i, ((h, w), (h0, w0)) in enumerate(zip(image_sizes, orig_sizes)):
            if not (0 < h <= padded_h and 0 < w <= padded_w):
                raise ValueError(
                    f"Mask2FormerInference: image_sizes[{i}]={(h, w)} outside padded size {(padded_h, padded_w)}"
                )
            if h0 < 1 or w0 < 1:
                raise ValueError(f"Mask2FormerInference: orig_sizes[{i}]={(h0, w0)} must be positive")
