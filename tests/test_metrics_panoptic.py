"""Panoptic quality: hand-computed cases, a loop-based re-statement of panopticapi's algorithm on random
images (crowd + void), torchmetrics' PanopticQuality where the definitions coincide, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proscale.metrics.panoptic import PanopticQualityEvaluator
from proscale.metrics.pq_stats import IdIndexer
from proscale.structures import DatasetMeta
from proscale.testing.metrics import PairConfig, prediction_from_gt, random_pair

PERSON, CAR, SKY, GRASS = 0, 1, 2, 3
META = DatasetMeta(
    class_names=["person", "car", "sky", "grass"], category_ids=[1, 3, 100, 101], isthing=[True, True, False, False]
)


def gt_seg(sid: int, cat: int, crowd: int = 0) -> dict:
    return {"id": sid, "category": cat, "iscrowd": crowd, "area": 0}


def pred_seg(sid: int, cat: int) -> dict:
    return {"id": sid, "category_id": cat, "isthing": META.isthing[cat], "score": 1.0, "area": 0}


def score(gt_map, gt_segments, pred_map, pred_segments, meta=META):
    ev = PanopticQualityEvaluator(meta)
    ev.update([{"panoptic_seg": (pred_map, pred_segments)}], [{"panoptic": gt_map, "segments": gt_segments}])
    metrics = dict(ev.compute())
    assert set(metrics) == {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"}
    metrics.update({f"num_classes_{group}": n for group, n in ev.num_classes_counted.items()})
    return metrics, {row["name"]: row for row in ev.per_class}


def canvas(fill: int) -> torch.Tensor:
    return torch.full((20, 20), fill, dtype=torch.int64)


def approx(x: float) -> pytest.approx:
    return pytest.approx(x, abs=1e-9)


def test_perfect_prediction_scores_100():
    gt = canvas(10)
    gt[0:10, 0:10] = 1
    gt[12:18, 12:18] = 2
    gt[15:20, 0:5] = 0
    segments = [gt_seg(10, SKY), gt_seg(1, PERSON), gt_seg(2, CAR)]
    metrics, rows = score(gt, segments, gt.clone(), [pred_seg(10, SKY), pred_seg(1, PERSON), pred_seg(2, CAR)])
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert metrics[key] == approx(100.0), key
    assert rows["person"]["TP"] == 1 and rows["car"]["TP"] == 1 and rows["sky"]["TP"] == 1
    assert math.isnan(rows["grass"]["PQ"]) and metrics["num_classes_all"] == 3


def test_shifted_thing_small_and_large_shift():
    gt = canvas(10)
    gt[0:10, 0:10] = 1
    pred = canvas(5)
    pred[0:10, 2:12] = 7  # 80 px overlap, union 120 -> IoU 2/3; sky: 280 / 320
    metrics, rows = score(gt, [gt_seg(10, SKY), gt_seg(1, PERSON)], pred, [pred_seg(5, SKY), pred_seg(7, PERSON)])
    assert rows["person"]["SQ"] == approx(200 / 3) and rows["person"]["RQ"] == approx(100)
    assert rows["sky"]["PQ"] == approx(87.5)
    assert metrics["PQ"] == approx((200 / 3 + 87.5) / 2)
    assert metrics["PQ_th"] == approx(200 / 3) and metrics["PQ_st"] == approx(87.5)
    assert metrics["RQ"] == approx(100.0)

    pred = canvas(5)
    pred[0:10, 6:16] = 7  # overlap 40, union 160 -> IoU 0.25: one FN + one FP; sky 240 / 360
    metrics, rows = score(gt, [gt_seg(10, SKY), gt_seg(1, PERSON)], pred, [pred_seg(5, SKY), pred_seg(7, PERSON)])
    assert (rows["person"]["TP"], rows["person"]["FP"], rows["person"]["FN"]) == (0, 1, 1)
    assert rows["person"]["PQ"] == 0 and rows["person"]["SQ"] == 0
    assert metrics["PQ"] == approx((0 + 200 / 3) / 2)
    assert metrics["SQ"] == approx((0 + 200 / 3) / 2)
    assert metrics["RQ"] == approx(50.0)


def test_split_segment():
    gt = canvas(10)
    gt[0:10, 0:10] = 2
    segments = [gt_seg(10, SKY), gt_seg(2, CAR)]
    pred = canvas(10)
    pred[0:10, 0:6] = 1  # 60 px -> IoU 0.6, TP
    pred[0:10, 6:10] = 2  # 40 px -> IoU 0.4, FP
    metrics, rows = score(gt, segments, pred, [pred_seg(10, SKY), pred_seg(1, CAR), pred_seg(2, CAR)])
    car = rows["car"]
    assert (car["TP"], car["FP"], car["FN"]) == (1, 1, 0)
    assert car["SQ"] == approx(60.0) and car["RQ"] == approx(200 / 3) and car["PQ"] == approx(40.0)
    assert metrics["PQ"] == approx((40 + 100) / 2)

    pred[0:10, 5:10] = 2  # 50 / 50: IoU exactly 0.5 is not a match (strict >)
    metrics, rows = score(gt, segments, pred, [pred_seg(10, SKY), pred_seg(1, CAR), pred_seg(2, CAR)])
    assert (rows["car"]["TP"], rows["car"]["FP"], rows["car"]["FN"]) == (0, 2, 1)
    assert rows["car"]["PQ"] == 0


def test_merged_segments():
    gt = canvas(10)
    gt[0:10, 0:6] = 1
    gt[0:10, 6:10] = 2
    pred = canvas(10)
    pred[0:10, 0:10] = 3  # IoU 0.6 with person 1, 0.4 with person 2
    segments = [gt_seg(10, SKY), gt_seg(1, PERSON), gt_seg(2, PERSON)]
    metrics, rows = score(gt, segments, pred, [pred_seg(10, SKY), pred_seg(3, PERSON)])
    person = rows["person"]
    assert (person["TP"], person["FP"], person["FN"]) == (1, 0, 1)
    assert person["PQ"] == approx(40.0) and person["SQ"] == approx(60.0)
    assert metrics["PQ_th"] == approx(40.0) and metrics["PQ_st"] == approx(100.0)


def test_void_regions():
    gt = canvas(10)
    gt[0:10, 0:10] = 1
    gt[10:20, 0:10] = 0  # void
    pred = canvas(5)
    pred[0:15, 0:10] = 1  # 150 px, 50 on void: IoU = 100 / (150 + 100 - 100 - 50) = 1
    pred[15:20, 0:4] = 2  # car fully on void: not a false positive
    pred[15:20, 8:12] = 3  # car half on void (10 of 20 px): exactly half is still a false positive
    segments = [gt_seg(10, SKY), gt_seg(1, PERSON)]
    preds = [pred_seg(5, SKY), pred_seg(1, PERSON), pred_seg(2, CAR), pred_seg(3, CAR)]
    metrics, rows = score(gt, segments, pred, preds)
    assert rows["person"]["SQ"] == approx(100.0) and rows["person"]["TP"] == 1
    assert (rows["car"]["TP"], rows["car"]["FP"], rows["car"]["FN"]) == (0, 1, 0)
    assert rows["sky"]["PQ"] == approx(95.0)  # 190 / (210 + 200 - 190 - 20)
    assert metrics["PQ"] == approx((100 + 0 + 95) / 3)
    assert metrics["RQ"] == approx(200 / 3)
    assert metrics["PQ_th"] == approx(50.0) and metrics["PQ_st"] == approx(95.0)


def test_crowd_regions():
    gt = canvas(10)
    gt[0:10, 0:10] = 1
    gt[10:20, 10:20] = 2  # person crowd
    gt[0:5, 15:20] = 3  # car crowd
    segments = [gt_seg(10, SKY), gt_seg(1, PERSON), gt_seg(2, PERSON, crowd=1), gt_seg(3, CAR, crowd=1)]
    pred = canvas(10)
    pred[0:10, 0:10] = 1
    pred[10:20, 10:15] = 2  # person on the person crowd: ignored
    pred[10:20, 15:20] = 4  # car on the *person* crowd: false positive
    pred[0:5, 15:20] = 5  # car exactly on the car crowd: ignored, and no crowd match
    preds = [pred_seg(10, SKY), pred_seg(1, PERSON), pred_seg(2, PERSON), pred_seg(4, CAR), pred_seg(5, CAR)]
    metrics, rows = score(gt, segments, pred, preds)
    assert (rows["person"]["TP"], rows["person"]["FP"], rows["person"]["FN"]) == (1, 0, 0)
    assert (rows["car"]["TP"], rows["car"]["FP"], rows["car"]["FN"]) == (0, 1, 0)
    assert rows["sky"]["PQ"] == approx(100.0)
    assert metrics["PQ"] == approx(200 / 3) and metrics["PQ_th"] == approx(50.0) and metrics["RQ_th"] == approx(50.0)


def test_missing_class_and_absent_classes():
    gt = canvas(10)
    gt[15:20, :] = 11  # grass, 100 px
    pred = canvas(5)  # sky everywhere: IoU 300 / 400 with GT sky, grass missed
    metrics, rows = score(gt, [gt_seg(10, SKY), gt_seg(11, GRASS)], pred, [pred_seg(5, SKY)])
    assert rows["sky"]["PQ"] == approx(75.0)
    assert (rows["grass"]["TP"], rows["grass"]["FN"]) == (0, 1) and rows["grass"]["PQ"] == 0
    assert metrics["PQ"] == approx(37.5) and metrics["SQ"] == approx(37.5) and metrics["RQ"] == approx(50.0)
    assert math.isnan(metrics["PQ_th"]) and metrics["num_classes_th"] == 0
    assert math.isnan(rows["person"]["PQ"]) and math.isnan(rows["car"]["PQ"])


def test_accumulates_over_images_before_averaging():
    gt = canvas(10)
    gt[0:10, 0:10] = 1
    pred_good = canvas(10)
    pred_good[0:10, 0:10] = 1
    pred_bad = canvas(10)  # person missed
    ev = PanopticQualityEvaluator(META)
    gts = [{"panoptic": gt, "segments": [gt_seg(10, SKY), gt_seg(1, PERSON)]}] * 2
    preds = [
        {"panoptic_seg": (pred_good, [pred_seg(10, SKY), pred_seg(1, PERSON)])},
        {"panoptic_seg": (pred_bad, [pred_seg(10, SKY)])},
    ]
    ev.update(preds, gts)
    rows = {r["name"]: r for r in (ev.compute(), ev.per_class)[1]}
    assert (rows["person"]["TP"], rows["person"]["FN"]) == (1, 1)
    assert rows["person"]["PQ"] == approx(100 / 1.5)  # 1 / (1 + 0.5), not the mean of 100 and 0
    assert rows["sky"]["TP"] == 2


# ---- random images: an independent, loop-based statement of panopticapi's algorithm -------------------------


def reference_stats(gt: dict, pred: dict, num_classes: int) -> np.ndarray:
    """Per-class [iou_sum, tp, fp, fn] following panopticapi/evaluation.py step by step (slow, obvious)."""
    gt_map, pred_map = gt["panoptic"].numpy(), pred["panoptic_seg"][0].numpy()
    gt_segms = {s["id"]: s for s in gt["segments"]}
    pred_segms = {s["id"]: s for s in pred["panoptic_seg"][1]}
    gt_area = {i: int((gt_map == i).sum()) for i in gt_segms}
    pred_area = {i: int((pred_map == i).sum()) for i in pred_segms}
    pairs, counts = np.unique(gt_map.astype(np.int64) * (1 << 24) + pred_map, return_counts=True)
    inter = {(int(p) >> 24, int(p) & ((1 << 24) - 1)): int(c) for p, c in zip(pairs, counts)}
    out = np.zeros((num_classes, 4))
    gt_matched, pred_matched = set(), set()
    for (g, p), n in inter.items():
        if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"]:
            continue
        if gt_segms[g]["category"] != pred_segms[p]["category_id"]:
            continue
        iou = n / (pred_area[p] + gt_area[g] - n - inter.get((0, p), 0))
        if iou > 0.5:
            out[gt_segms[g]["category"]] += (iou, 1, 0, 0)
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_of = {}
    for g, s in gt_segms.items():
        if g in gt_matched:
            continue
        if s["iscrowd"]:
            crowd_of.setdefault(s["category"], []).append(g)
            continue
        out[s["category"], 3] += 1
    for p, s in pred_segms.items():
        if p in pred_matched:
            continue
        ignored = inter.get((0, p), 0) + sum(inter.get((g, p), 0) for g in crowd_of.get(s["category_id"], []))
        if ignored / pred_area[p] > 0.5:
            continue
        out[s["category_id"], 2] += 1
    return out


def test_random_images_match_reference_statement():
    meta = DatasetMeta(
        class_names=[f"c{i}" for i in range(7)],
        category_ids=[1, 2, 4, 7, 90, 91, 95],
        isthing=[True, True, True, True, False, False, False],
    )
    g = torch.Generator().manual_seed(1)
    cfg = PairConfig(crowd_prob=0.3, gt_void_rects=3, pred_void_rects=2, with_instances=False, with_sem_seg=False)
    ev = PanopticQualityEvaluator(meta)
    expected = np.zeros((meta.num_classes, 4))
    for _ in range(40):
        pred, gt = random_pair(meta, 48, 64, g, cfg)
        ev.update([pred], [gt])
        expected += reference_stats(gt, pred, meta.num_classes)
    np.testing.assert_allclose(ev.iou_sum.numpy(), expected[:, 0], atol=1e-9)
    np.testing.assert_array_equal(ev.tp.numpy(), expected[:, 1])
    np.testing.assert_array_equal(ev.fp.numpy(), expected[:, 2])
    np.testing.assert_array_equal(ev.fn.numpy(), expected[:, 3])
    assert expected[:, 1].sum() > 20 and expected[:, 2].sum() > 10 and expected[:, 3].sum() > 10  # non-trivial


def to_torchmetrics(id_map: torch.Tensor, segments: list[dict], cat_key: str, meta: DatasetMeta) -> torch.Tensor:
    """Id map -> (H, W, 2) (dataset category, instance) pairs; void -> an id outside things/stuffs."""
    void_cat = max(meta.category_ids) + 1
    out = torch.zeros(*id_map.shape, 2, dtype=torch.int64)
    out[..., 0] = void_cat
    for n, s in enumerate(segments, start=1):
        where = id_map == s["id"]
        out[..., 0][where] = meta.category_ids[s[cat_key]]
        out[..., 1][where] = n if meta.isthing[s[cat_key]] else 0
    return out


def test_random_images_agree_with_torchmetrics():
    """Where the definitions coincide: torchmetrics has no crowd (so no crowd GT here), treats all stuff pixels of
    a category as one segment (so at most one segment per stuff class, ``distinct_stuff``) and also discounts
    the GT pixels that a prediction leaves void, dropping FNs that are mostly unpredicted (so predictions cover
    every pixel here; GT void is present and is handled identically)."""
    from torchmetrics.detection import PanopticQuality

    meta = DatasetMeta(
        class_names=[f"c{i}" for i in range(6)],
        category_ids=[1, 2, 4, 90, 91, 95],
        isthing=[True, True, True, False, False, False],
    )
    things = [c for c, t in zip(meta.category_ids, meta.isthing) if t]
    stuffs = [c for c, t in zip(meta.category_ids, meta.isthing) if not t]
    tm = PanopticQuality(things=things, stuffs=stuffs, return_sq_and_rq=True, return_per_class=True)
    ev = PanopticQualityEvaluator(meta)
    g = torch.Generator().manual_seed(2)
    cfg = PairConfig(crowd_prob=0.0, pred_void_rects=0, distinct_stuff=True, with_instances=False, with_sem_seg=False)
    for _ in range(25):
        pred, gt = random_pair(meta, 40, 48, g, cfg)
        assert bool((pred["panoptic_seg"][0] > 0).all())
        ev.update([pred], [gt])
        tm.update(
            to_torchmetrics(pred["panoptic_seg"][0], pred["panoptic_seg"][1], "category_id", meta)[None],
            to_torchmetrics(gt["panoptic"], gt["segments"], "category", meta)[None],
        )
    ours = ev.compute()
    # torchmetrics orders classes as sorted thing ids, then sorted stuff ids -- the order of ``meta`` here
    np.testing.assert_array_equal(tm.true_positives.numpy(), ev.tp.numpy())
    np.testing.assert_array_equal(tm.false_positives.numpy(), ev.fp.numpy())
    np.testing.assert_array_equal(tm.false_negatives.numpy(), ev.fn.numpy())
    # torchmetrics sums float32 IoUs; we compare on its 0-1 scale to 1e-6
    np.testing.assert_allclose(tm.iou_sum.numpy(), ev.iou_sum.numpy(), atol=1e-5)
    per_class = tm.compute().double()  # (K, 3): pq, sq, rq on 0-1
    for k, row in enumerate(ev.per_class):
        if not math.isnan(row["PQ"]):
            assert row["PQ"] / 100 == pytest.approx(float(per_class[k, 0]), abs=1e-6)
            assert row["SQ"] / 100 == pytest.approx(float(per_class[k, 1]), abs=1e-6)
            assert row["RQ"] / 100 == pytest.approx(float(per_class[k, 2]), abs=1e-6)
    tm_avg = PanopticQuality(things=things, stuffs=stuffs, return_sq_and_rq=True)
    tm_avg.iou_sum, tm_avg.true_positives = tm.iou_sum, tm.true_positives
    tm_avg.false_positives, tm_avg.false_negatives = tm.false_positives, tm.false_negatives
    pq, sq, rq = (float(v) for v in tm_avg.compute())
    assert (ours["PQ"] / 100, ours["SQ"] / 100, ours["RQ"] / 100) == (
        pytest.approx(pq, abs=1e-6),
        pytest.approx(sq, abs=1e-6),
        pytest.approx(rq, abs=1e-6),
    )


def test_perfect_random_predictions_and_reset():
    g = torch.Generator().manual_seed(3)
    ev = PanopticQualityEvaluator(META)
    for _ in range(5):
        _, gt = random_pair(META, 40, 40, g)
        ev.update([prediction_from_gt(gt, META)], [gt])
    metrics = ev.compute()
    assert metrics["PQ"] == approx(100.0) and metrics["PQ_th"] == approx(100.0) and metrics["PQ_st"] == approx(100.0)
    ev.reset()
    assert int(ev.tp.sum()) == 0


def test_large_ids_beyond_lookup_table_use_search():
    gt = canvas(10)
    gt[0:10, 0:10] = 1 << 30
    pred = canvas(5)
    pred[0:10, 0:10] = (1 << 30) + 5
    metrics, _ = score(
        gt, [gt_seg(10, SKY), gt_seg(1 << 30, PERSON)], pred, [pred_seg(5, SKY), pred_seg((1 << 30) + 5, PERSON)]
    )
    assert metrics["PQ"] == approx(100.0)


def test_bad_inputs_raise_clear_errors():
    gt = canvas(10)
    gt[0:5, 0:5] = 99  # not listed
    with pytest.raises(ValueError, match=r"GT: id map contains segment ids \[99\]"):
        score(gt, [gt_seg(10, SKY)], canvas(5), [pred_seg(5, SKY)])
    with pytest.raises(ValueError, match=r"prediction: id map contains segment ids \[5\]"):
        score(canvas(10), [gt_seg(10, SKY)], canvas(5), [])
    with pytest.raises(ValueError, match="outside"):
        score(canvas(10), [gt_seg(10, 7)], canvas(5), [pred_seg(5, SKY)])
    with pytest.raises(ValueError, match="differ in size"):
        score(canvas(10), [gt_seg(10, SKY)], torch.full((5, 5), 5), [pred_seg(5, SKY)])
    with pytest.raises(ValueError, match="duplicate"):
        IdIndexer()(canvas(1), np.array([1, 1]), "GT")
    with pytest.raises(ValueError, match="'panoptic_seg'"):
        PanopticQualityEvaluator(META).update([{}], [{"panoptic": canvas(10), "segments": []}])


def test_accelerator_index_path_matches_host_path():
    """The torch path used for CUDA maps (run here on CPU tensors) gives the same indices as the NumPy path."""
    g = torch.Generator().manual_seed(4)
    _, gt = random_pair(META, 32, 40, g)
    ids = np.array([s["id"] for s in gt["segments"]], dtype=np.int64)
    host = IdIndexer()(gt["panoptic"], ids, "GT")
    bound = int(max(gt["panoptic"].max(), ids.max())) + 1
    accel = IdIndexer()._index_torch(gt["panoptic"].reshape(-1), ids, bound, "GT")
    np.testing.assert_array_equal(accel.numpy(), host)
    with pytest.raises(ValueError, match="not in its segments list"):
        IdIndexer()._index_torch(gt["panoptic"].reshape(-1), ids[1:], bound, "GT")
