"""Instance (mask AP) evaluator for validation / test, through pycocotools' COCOeval.

Usage::

    evaluator = InstanceAPEvaluator(meta)
    evaluator.update(predictions, gts)   # predictions[i]["instances"] = {"masks", "scores", "labels"}
    metrics = evaluator.compute()        # {"AP", "AP50", "AP75", "APs", "APm", "APl"} on the 0-100 scale
    evaluator.per_class                  # [{"category_id", "name", "AP"}]

Ground truth per image: the *thing* segments of the panoptic GT (``gt["panoptic"] == id``), or for instance
datasets the (possibly overlapping) masks of ``gt["instances"]``, with their ``iscrowd`` flag, area = pixel count, category = the dataset id of ``meta``. Predictions of stuff classes are
dropped (COCO instance evaluation has thing categories only). Masks are RLE-encoded at ``update`` time so that
only compact strings are kept.

DDP: the kept records are Python lists (RLE strings), which torchmetrics' tensor-state sync cannot carry, so
``compute`` gathers them explicitly with ``torch.distributed.all_gather_object`` and every rank runs COCOeval on
the union. Images are keyed ``local_index * world_size + rank`` (unique over ranks; for a strided split such as
``DistributedSampler(shuffle=False)`` it equals the single-process index) unless ``image_ids`` are passed; with
``image_ids``, the images that ``DistributedSampler`` repeats to pad the split are scored once. Use
``update``/``compute``, not ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric

from proscale.metrics.coco_ap import coco_mask_ap
from proscale.metrics.rle import encode_masks
from proscale.structures import DatasetMeta


def _rank_and_world(group: Any = None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gt_image_size(gt: dict) -> tuple[int, int]:
    """(h0, w0) of a GT dict: from the panoptic map, or from the instance masks of instance-only datasets."""
    if "panoptic" in gt:
        h, w = gt["panoptic"].shape[-2:]
    elif "instances" in gt:
        h, w = gt["instances"]["masks"].shape[-2:]
    else:
        raise ValueError(f"ground truth has neither 'panoptic' nor 'instances' (keys: {sorted(gt)})")
    return int(h), int(w)


def _thing_masks(gt: dict, meta: DatasetMeta) -> tuple[torch.Tensor, list[int], list[int]]:
    """(N, h0, w0) bool masks, contiguous labels and iscrowd flags of the GT's thing instances.

    Instance datasets (COCO instance) give overlapping masks in ``gt["instances"]``; panoptic datasets give the
    thing segments of the id map.
    """
    if "instances" in gt:
        inst = gt["instances"]
        labels = [int(c) for c in inst["labels"].tolist()]
        crowd = [int(c) for c in inst.get("iscrowd", torch.zeros(len(labels))).tolist()]
        keep = [k for k, c in enumerate(labels) if meta.isthing[c]]
        return inst["masks"][keep].bool(), [labels[k] for k in keep], [crowd[k] for k in keep]
    things = [s for s in gt["segments"] if meta.isthing[int(s["category"])]]
    pan = gt["panoptic"]
    ids = torch.tensor([int(s["id"]) for s in things], device=pan.device, dtype=pan.dtype)
    masks = pan[None] == ids[:, None, None]
    return masks, [int(s["category"]) for s in things], [int(s.get("iscrowd", 0)) for s in things]


def gt_instances(gt: dict, meta: DatasetMeta, image_id: int) -> list[dict]:
    """COCO GT annotations (RLE) for the thing instances of one GT dict (panoptic or instance format)."""
    masks, labels, crowd = _thing_masks(gt, meta)
    if not labels:
        return []
    areas = masks.flatten(1).sum(1).tolist()
    anns = []
    for label, iscrowd, rle, area in zip(labels, crowd, encode_masks(masks), areas):
        if area == 0:  # listed but absent from the map: no pixels to score against
            continue
        anns.append(
            {
                "image_id": image_id,
                "category_id": meta.category_ids[label],
                "segmentation": rle,
                "area": float(area),
                "iscrowd": iscrowd,
            }
        )
    return anns


def instance_results(instances: dict, meta: DatasetMeta, image_id: int) -> list[dict]:
    """COCO results (RLE) for one image's ``{"masks" (N,h,w), "scores" (N,), "labels" (N,)}``, things only."""
    try:
        masks, scores, labels = instances["masks"], instances["scores"], instances["labels"]
    except KeyError as err:
        raise ValueError(f"'instances' prediction needs masks, scores and labels; missing {err}") from None
    labels_list = [int(v) for v in labels.tolist()]
    for label in labels_list:
        if not 0 <= label < meta.num_classes:
            raise ValueError(f"instance label {label} outside [0, {meta.num_classes})")
    keep = [i for i, label in enumerate(labels_list) if meta.isthing[label]]
    if not keep:
        return []
    keep_t = torch.tensor(keep, device=masks.device)
    rles = encode_masks(masks.index_select(0, keep_t) > 0)
    scores_list = scores.detach().float().cpu().tolist()
    return [
        {
            "image_id": image_id,
            "category_id": meta.category_ids[labels_list[i]],
            "segmentation": rle,
            "score": float(scores_list[i]),
        }
        for i, rle in zip(keep, rles)
    ]


class InstanceAPEvaluator(Metric):
    """COCO mask AP accumulated over images; ``compute()`` -> dict of floats (0-100), ``per_class`` rows."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, meta: DatasetMeta, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meta = meta
        self.per_class: list[dict] = []
        self._clear()

    def _clear(self) -> None:
        self._records: list[tuple[dict, list[dict], list[dict]]] = []  # per image: (image, GT anns, results)
        self._seen = 0

    def reset(self) -> None:
        super().reset()
        self._clear()

    def forward(self, *args: Any, **kwargs: Any) -> None:  # batch-level values would need a full COCOeval
        self.update(*args, **kwargs)

    def update(self, predictions: list[dict], gts: list[dict], image_ids: list[int] | None = None) -> None:
        """Add a batch (formats in ``proscale.structures``); ``image_ids`` optional, globally unique."""
        if len(predictions) != len(gts):
            raise ValueError(f"got {len(predictions)} predictions for {len(gts)} ground-truth images")
        rank, world = _rank_and_world(self.process_group)
        for i, (pred, gt) in enumerate(zip(predictions, gts)):
            if "instances" not in pred:
                raise ValueError(f"prediction has no 'instances' (keys: {sorted(pred)})")
            image_id = int(image_ids[i]) if image_ids is not None else self._seen * world + rank
            self._seen += 1
            h, w = gt_image_size(gt)
            image = {"id": image_id, "height": h, "width": w}
            anns = gt_instances(gt, self.meta, image_id)
            self._records.append((image, anns, instance_results(pred["instances"], self.meta, image_id)))

    def _gathered(self) -> list[tuple[dict, list[dict], list[dict]]]:
        _, world = _rank_and_world(self.process_group)
        if world == 1:
            return self._records
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, self._records, group=self.process_group)
        return [record for part in parts for record in part]

    def compute(self) -> dict[str, float]:
        """AP, AP50, AP75, APs, APm, APl (0-100; NaN where COCOeval has nothing to score); fills ``per_class``.

        An image id seen twice (``DistributedSampler`` pads the split by repeating images) is scored once.
        """
        unique: dict[int, tuple] = {}
        for record in self._gathered():
            unique.setdefault(record[0]["id"], record)
        # a fixed order makes COCOeval's score-tie breaking independent of how images were spread over ranks
        records = [unique[i] for i in sorted(unique)]
        images = [r[0] for r in records]
        gt = [a for r in records for a in r[1]]
        results = [d for r in records for d in r[2]]
        categories = [
            {"id": self.meta.category_ids[k], "name": self.meta.class_names[k]} for k in self.meta.thing_classes
        ]
        metrics, self.per_class = coco_mask_ap(images, gt, categories, results)
        return metrics
