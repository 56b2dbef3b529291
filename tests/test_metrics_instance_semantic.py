"""Mask AP equals pycocotools' COCOeval run directly on the same inputs; mIoU equals a direct confusion-matrix
computation (and torchmetrics' JaccardIndex when every class occurs in the GT)."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.classification import MulticlassJaccardIndex

from proscale.metrics.instance import InstanceAPEvaluator
from proscale.metrics.rle import decode_rle, encode_masks
from proscale.metrics.semantic import SemanticSegEvaluator
from proscale.structures import DatasetMeta
from proscale.testing.metrics import PairConfig, prediction_from_gt, random_pair

META = DatasetMeta(
    class_names=["a", "b", "c", "d", "sky", "grass"],
    category_ids=[1, 2, 5, 9, 90, 91],
    isthing=[True, True, True, True, False, False],
)


def direct_cocoeval(pairs: list[tuple[dict, dict]], meta: DatasetMeta) -> np.ndarray:
    """COCOeval on hand-built COCO dicts, per-mask Fortran encoding, no proscale code involved."""
    images, anns, dets = [], [], []
    for image_id, (pred, gt) in enumerate(pairs):
        pan = gt["panoptic"].numpy()
        images.append({"id": image_id, "height": pan.shape[0], "width": pan.shape[1]})
        for s in gt["segments"]:
            if not meta.isthing[s["category"]]:
                continue
            m = np.asfortranarray((pan == s["id"]).astype(np.uint8))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": meta.category_ids[s["category"]],
                    "segmentation": mask_utils.encode(m),
                    "area": float(m.sum()),
                    "iscrowd": s["iscrowd"],
                }
            )
        inst = pred["instances"]
        for m, score, label in zip(inst["masks"].numpy(), inst["scores"].tolist(), inst["labels"].tolist()):
            dets.append(
                {
                    "image_id": image_id,
                    "category_id": meta.category_ids[label],
                    "segmentation": mask_utils.encode(np.asfortranarray(m.astype(np.uint8))),
                    "score": score,
                }
            )
    cats = [{"id": meta.category_ids[k], "name": meta.class_names[k]} for k in meta.thing_classes]
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO()
        gt_coco.dataset = {"images": images, "annotations": anns, "categories": cats}
        gt_coco.createIndex()
        dt_coco = gt_coco.loadRes(dets)
        ev = COCOeval(gt_coco, dt_coco, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


def test_rle_round_trip():
    masks = torch.rand(3, 17, 23) > 0.5
    for m, rle in zip(masks, encode_masks(masks)):
        assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(rle), m.numpy())
    assert encode_masks(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_mask_ap_equals_direct_cocoeval():
    g = torch.Generator().manual_seed(5)
    cfg = PairConfig(crowd_prob=0.2, with_sem_seg=False)
    pairs = [random_pair(META, 96, 128, g, cfg) for _ in range(12)]
    ev = InstanceAPEvaluator(META)
    for pred, gt in pairs[:5]:
        ev.update([pred], [gt])
    ev.update([p for p, _ in pairs[5:]], [t for _, t in pairs[5:]])
    ours = ev.compute()
    expected = direct_cocoeval(pairs, META)
    for key, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), expected):
        if value < 0:
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(100 * value, abs=1e-9), key
    assert 0 < ours["AP"] < 100 and not math.isnan(ours["APm"])
    assert len(ev.per_class) == 4 and {r["category_id"] for r in ev.per_class} == {1, 2, 5, 9}


def test_perfect_instances_score_100_and_stuff_predictions_are_ignored():
    g = torch.Generator().manual_seed(6)
    ev = InstanceAPEvaluator(META)
    for _ in range(4):
        _, gt = random_pair(META, 64, 64, g, PairConfig(crowd_prob=0.3))
        pred = prediction_from_gt(gt, META)
        stuff = [s for s in gt["segments"] if not META.isthing[s["category"]]][:1]
        if stuff:  # a confident stuff "instance" must not count as a false positive
            inst = pred["instances"]
            inst["masks"] = torch.cat([inst["masks"], (gt["panoptic"] == stuff[0]["id"])[None]])
            inst["scores"] = torch.cat([inst["scores"], torch.ones(1)])
            inst["labels"] = torch.cat([inst["labels"], torch.tensor([stuff[0]["category"]])])
        ev.update([pred], [gt])
    metrics = ev.compute()
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(100.0)


def test_no_detections_scores_zero_and_bad_labels_raise():
    g = torch.Generator().manual_seed(7)
    _, gt = random_pair(META, 64, 64, g, PairConfig(crowd_prob=0.0, max_things=6))
    empty = {"masks": torch.zeros(0, 64, 64, dtype=torch.bool), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    ev = InstanceAPEvaluator(META)
    ev.update([{"instances": empty}], [gt])
    if any(META.isthing[s["category"]] for s in gt["segments"]):
        assert ev.compute()["AP"] == 0.0
    bad = {"masks": torch.ones(1, 64, 64, dtype=torch.bool), "scores": torch.ones(1), "labels": torch.tensor([6])}
    with pytest.raises(ValueError, match="label 6 outside"):
        ev.update([{"instances": bad}], [gt])
    with pytest.raises(ValueError, match="'instances'"):
        ev.update([{}], [gt])


def direct_confusion(pairs: list[tuple[dict, dict]], k: int, ignore: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    for pred, gt in pairs:
        p = pred["sem_seg"].argmax(0).numpy().ravel()
        t = gt["sem_seg"].numpy().ravel()
        for ti, pi in zip(t, p):
            if ti != ignore:
                cm[ti, pi] += 1
    return cm


def test_miou_equals_direct_confusion_matrix():
    g = torch.Generator().manual_seed(8)
    pairs = [random_pair(META, 24, 32, g, PairConfig(with_instances=False)) for _ in range(6)]
    # scores with noise so that the argmax is not just the pasted labels
    for pred, _ in pairs:
        pred["sem_seg"] = pred["sem_seg"] + 0.8 * torch.rand(pred["sem_seg"].shape, generator=g)
    ev = SemanticSegEvaluator(META)
    for pred, gt in pairs:
        ev.update([pred], [gt])
    metrics = ev.compute()
    cm = direct_confusion(pairs, META.num_classes, META.ignore_label)
    np.testing.assert_array_equal(ev.confmat.numpy(), cm)
    present = cm.sum(1) > 0
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert metrics["mIoU"] == pytest.approx(100 * iou[present].mean(), abs=1e-9)
    assert metrics["pAcc"] == pytest.approx(100 * np.diag(cm).sum() / cm.sum(), abs=1e-9)
    assert metrics["mAcc"] == pytest.approx(100 * (np.diag(cm) / np.maximum(cm.sum(1), 1))[present].mean(), abs=1e-9)
    assert present.all()  # then torchmetrics' macro Jaccard (which also averages predicted-only classes) agrees
    jac = MulticlassJaccardIndex(META.num_classes, ignore_index=META.ignore_label)
    for pred, gt in pairs:
        jac.update(pred["sem_seg"].argmax(0)[None], gt["sem_seg"][None])
    assert metrics["mIoU"] == pytest.approx(100 * float(jac.compute()), abs=1e-4)


def test_miou_ignores_void_and_classes_absent_from_gt():
    meta = DatasetMeta(class_names=["x", "y", "z"], category_ids=[1, 2, 3], isthing=[False] * 3)
    gt = torch.tensor([[0, 0, 255, 1]])
    pred_labels = torch.tensor([[0, 2, 2, 1]])  # the pixel on void is ignored; class 2 appears only in the prediction
    scores = torch.nn.functional.one_hot(pred_labels, 3).permute(2, 0, 1).float()
    ev = SemanticSegEvaluator(meta)
    ev.update([{"sem_seg": scores}], [{"sem_seg": gt}])
    metrics = ev.compute()
    assert metrics["mIoU"] == pytest.approx(100 * (0.5 + 1.0) / 2)  # class 2 is not averaged (absent from the GT)
    assert metrics["pAcc"] == pytest.approx(100 * 2 / 3)
    assert math.isnan(ev.per_class[2]["IoU"])
    with pytest.raises(ValueError, match=r"labels \[7\] outside"):
        ev.update([{"sem_seg": scores}], [{"sem_seg": torch.tensor([[0, 7, 255, 1]])}])
    with pytest.raises(ValueError, match="does not fit"):
        ev.update([{"sem_seg": scores[:2]}], [{"sem_seg": gt}])


def test_repeated_image_ids_are_scored_once():
    """DistributedSampler pads a split by repeating images; with image_ids the repeats do not count twice."""
    g = torch.Generator().manual_seed(9)
    pairs = [random_pair(META, 48, 64, g, PairConfig(with_sem_seg=False)) for _ in range(3)]
    once, padded = InstanceAPEvaluator(META), InstanceAPEvaluator(META)
    once.update([p for p, _ in pairs], [t for _, t in pairs], image_ids=[7, 8, 9])
    padded.update([p for p, _ in pairs] + [pairs[0][0]], [t for _, t in pairs] + [pairs[0][1]], image_ids=[7, 8, 9, 7])
    assert repr(padded.compute()) == repr(once.compute())  # repr: NaN-safe exact comparison


def test_instance_format_ground_truth_with_overlapping_masks():
    """COCO-instance GT (gt["instances"], overlapping masks, a crowd) scores like the panoptic path."""
    meta = DatasetMeta(["a", "b"], [1, 2], [True, True])
    masks = torch.zeros(3, 32, 40, dtype=torch.bool)
    masks[0, 2:20, 2:20] = True
    masks[1, 10:30, 10:30] = True  # overlaps mask 0
    masks[2, 0:5, 30:40] = True  # crowd: ignored, matched predictions on it are not false positives
    gt = {"instances": {"masks": masks, "labels": torch.tensor([0, 1, 1]), "iscrowd": torch.tensor([0, 0, 1])}}
    pred = {"instances": {"masks": masks[:2], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}}
    evaluator = InstanceAPEvaluator(meta)
    evaluator.update([pred], [gt])
    assert evaluator.compute()["AP"] == pytest.approx(100.0, abs=1e-6)
    wrong = {"instances": {"masks": masks[:2], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 0])}}
    evaluator = InstanceAPEvaluator(meta)
    evaluator.update([wrong], [gt])
    assert evaluator.compute()["AP"] == pytest.approx(0.0, abs=1e-6)
