#!/usr/bin/env python
"""Time panoptic-quality scoring: our evaluator on N generated 480x640 prediction/GT pairs, and torchmetrics'
``PanopticQuality`` on a subset of the same pairs (it is much slower; its time is extrapolated to N).

    python scripts/benchmark_eval.py                      # 5,000 images, torchmetrics on 10 of them
    python scripts/benchmark_eval.py --num-images 500 --torchmetrics-images 20 --json out.json

The pairs come from ``proscale.testing.metrics.random_pair`` with COCO's class count (80 things + 53 stuff), up
to 15 things per image and settings under which both definitions coincide (no crowd, predictions cover every
pixel, one segment per stuff class), so the two PQs printed at the end must agree. Generating 480x640 pairs costs
more than scoring them, so ``--pool`` distinct pairs are generated once and cycled (``--pool 0``: a fresh pair
per image); only ``update`` + ``compute`` are timed (wall and process CPU time: the latter is what counts when other
jobs share the cores). The conversion to torchmetrics' (category, instance) input
is not timed either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from proscale.metrics.panoptic import PanopticQualityEvaluator
from proscale.structures import DatasetMeta
from proscale.testing.metrics import PairConfig, random_pair
from proscale.utils.io import atomic_write_text

COCO_LIKE = DatasetMeta(
    class_names=[f"class{k}" for k in range(133)],
    category_ids=[k + 1 if k < 80 else k + 21 for k in range(133)],
    isthing=[k < 80 for k in range(133)],
)


def to_torchmetrics(id_map: torch.Tensor, segments: list[dict], cat_key: str, meta: DatasetMeta) -> torch.Tensor:
    """Id map -> (1, H, W, 2) (dataset category, instance id); void -> a category outside the dataset."""
    lut_cat = {0: max(meta.category_ids) + 1}
    lut_inst = {0: 0}
    for n, s in enumerate(segments, start=1):
        lut_cat[s["id"]] = meta.category_ids[s[cat_key]]
        lut_inst[s["id"]] = n if meta.isthing[s[cat_key]] else 0
    ids, inverse = torch.unique(id_map, return_inverse=True)
    cats = torch.tensor([lut_cat[int(i)] for i in ids])[inverse]
    inst = torch.tensor([lut_inst[int(i)] for i in ids])[inverse]
    return torch.stack([cats, inst], dim=-1)[None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--pool", type=int, default=200, help="distinct pairs generated and cycled (0 = all)")
    parser.add_argument("--torchmetrics-images", type=int, default=10, help="subset timed with torchmetrics")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = COCO_LIKE
    cfg = PairConfig(
        max_things=15, crowd_prob=0.0, pred_void_rects=0, distinct_stuff=True, with_instances=False, with_sem_seg=False
    )
    g = torch.Generator().manual_seed(args.seed)
    pool_size = args.pool if args.pool > 0 else args.num_images

    t0 = time.perf_counter()
    pool = [random_pair(meta, args.height, args.width, g, cfg) for _ in range(min(pool_size, args.num_images))]
    gen_time = time.perf_counter() - t0
    print(f"generated {len(pool)} distinct {args.height}x{args.width} pairs in {gen_time:.1f} s", flush=True)

    evaluator = PanopticQualityEvaluator(meta)
    timed = cpu = 0.0
    for start in range(0, args.num_images, args.batch_size):
        idx = range(start, min(start + args.batch_size, args.num_images))
        if args.pool > 0:
            batch = [pool[i % len(pool)] for i in idx]
        else:
            batch = [pool[i] for i in idx]
        t, c = time.perf_counter(), time.process_time()
        evaluator.update([p for p, _ in batch], [gt for _, gt in batch])
        timed += time.perf_counter() - t
        cpu += time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    ours = evaluator.compute()
    timed += time.perf_counter() - t
    cpu += time.process_time() - c
    print(f"ours: {args.num_images} images in {timed:.2f} s wall, {cpu:.2f} s CPU "
          f"({1000 * timed / args.num_images:.2f} ms/image wall), PQ {ours['PQ']:.3f} SQ {ours['SQ']:.3f} "
          f"RQ {ours['RQ']:.3f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)  # fmt: skip

    from torchmetrics.detection import PanopticQuality

    n_tm = min(args.torchmetrics_images, len(pool))
    things = [c for c, t in zip(meta.category_ids, meta.isthing) if t]
    stuffs = [c for c, t in zip(meta.category_ids, meta.isthing) if not t]
    tm = PanopticQuality(things=things, stuffs=stuffs, return_sq_and_rq=True)
    ours_subset = PanopticQualityEvaluator(meta)
    tm_time = ours_subset_time = 0.0
    for pred, gt in pool[:n_tm]:
        p = to_torchmetrics(pred["panoptic_seg"][0], pred["panoptic_seg"][1], "category_id", meta)
        target = to_torchmetrics(gt["panoptic"], gt["segments"], "category", meta)
        t = time.perf_counter()
        tm.update(p, target)
        tm_time += time.perf_counter() - t
        t = time.perf_counter()
        ours_subset.update([pred], [gt])
        ours_subset_time += time.perf_counter() - t
    t = time.perf_counter()
    tm_pq = [100 * float(v) for v in tm.compute()]
    tm_time += time.perf_counter() - t
    t = time.perf_counter()
    ours_sub = ours_subset.compute()
    ours_subset_time += time.perf_counter() - t
    tm_per_image = tm_time / n_tm
    ours_per_image = timed / args.num_images
    print(f"torchmetrics PanopticQuality: {n_tm} images in {tm_time:.2f} s ({1000 * tm_per_image:.1f} ms/image) -> "
          f"extrapolated {tm_per_image * args.num_images:.0f} s for {args.num_images} images", flush=True)  # fmt: skip
    print(f"same {n_tm} images: torchmetrics PQ/SQ/RQ {tm_pq[0]:.6f}/{tm_pq[1]:.6f}/{tm_pq[2]:.6f}, "
          f"ours {ours_sub['PQ']:.6f}/{ours_sub['SQ']:.6f}/{ours_sub['RQ']:.6f}; "
          f"ours took {ours_subset_time:.2f} s there")  # fmt: skip
    ratio = tm_per_image / ours_per_image
    print(f"speed ratio (torchmetrics time / ours, per image): {ratio:.0f}x")
    result = {
        "num_images": args.num_images,
        "size": [args.height, args.width],
        "distinct_pairs": len(pool),
        "threads": torch.get_num_threads(),
        "ours_seconds": timed,
        "ours_cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
        "ours_ms_per_image": 1000 * ours_per_image,
        "torchmetrics_images": n_tm,
        "torchmetrics_ms_per_image": 1000 * tm_per_image,
        "torchmetrics_extrapolated_seconds": tm_per_image * args.num_images,
        "speed_ratio": ratio,
        "PQ_ours": ours["PQ"],
        "PQ_subset_ours": ours_sub["PQ"],
        "PQ_subset_torchmetrics": tm_pq[0],
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    agree = abs(tm_pq[0] - ours_sub["PQ"]) < 1e-4
    print("PQ agreement on the subset:", "yes" if agree else "NO")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
