"""Two processes (gloo, torch.multiprocessing spawn, CPU) evaluating halves of a split give exactly the metrics of
one process evaluating all of it, for the panoptic, instance and semantic evaluators; exporting from two
processes writes the same files as from one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proscale.metrics import build_evaluators
from proscale.metrics.export import InstanceExporter, PanopticExporter
from proscale.structures import DatasetMeta
from proscale.testing.metrics import PairConfig, random_pair

META = DatasetMeta(
    class_names=["a", "b", "c", "sky", "grass"],
    category_ids=[1, 2, 7, 90, 91],
    isthing=[True, True, True, False, False],
)
NUM_IMAGES = 9  # uneven: rank 0 gets 5 images, rank 1 gets 4


def make_pairs() -> list[tuple[dict, dict]]:
    g = torch.Generator().manual_seed(21)
    return [random_pair(META, 40, 56, g, PairConfig(crowd_prob=0.2)) for _ in range(NUM_IMAGES)]


def evaluate(pairs: list[tuple[dict, dict]]) -> dict:
    evaluators = build_evaluators(META)
    for start in range(0, len(pairs), 2):  # batches of two
        batch = pairs[start : start + 2]
        for ev in evaluators.values():
            ev.update([p for p, _ in batch], [g for _, g in batch])
    out = {}
    for name, ev in evaluators.items():
        out[name] = ev.compute()
        out[name + "_per_class"] = ev.per_class
    return out


def export(pairs: list[tuple[dict, dict]], image_ids: list[int], out_dir: Path) -> None:
    panoptic = PanopticExporter(out_dir, META)
    instances = InstanceExporter(out_dir / "instances.json", META)
    for image_id, (pred, _) in zip(image_ids, pairs):
        panoptic.add(image_id, f"{image_id:04d}.jpg", pred)
        instances.add(image_id, pred)
    panoptic.finalize()
    instances.finalize()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = make_pairs()[rank::world]  # what DistributedSampler(shuffle=False) gives each rank
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(evaluate(shard)))
        export(shard, list(range(NUM_IMAGES))[rank::world], Path(out_dir) / "export_ddp")
    finally:
        dist.destroy_process_group()


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):  # IoU sums are added in a different order (per rank, then across ranks)
        return abs(a - b) <= 1e-9
    return a == b


def test_two_process_ddp_equals_single_process(tmp_path):
    single = json.loads(json.dumps(evaluate(make_pairs())))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in ("panoptic", "instance", "semantic"):
            assert same(ranked[name], single[name]), (rank, name, ranked[name], single[name])
            assert same(ranked[name + "_per_class"], single[name + "_per_class"]), (rank, name)
    assert 0 < single["panoptic"]["PQ"] < 100 and 0 < single["instance"]["AP"] < 100
    assert 0 < single["semantic"]["mIoU"] < 100

    export(make_pairs(), list(range(NUM_IMAGES)), tmp_path / "export_single")
    ddp_files = sorted(p.relative_to(tmp_path / "export_ddp") for p in (tmp_path / "export_ddp").rglob("*"))
    single_files = sorted(p.relative_to(tmp_path / "export_single") for p in (tmp_path / "export_single").rglob("*"))
    assert ddp_files == single_files and len(ddp_files) == NUM_IMAGES + 3  # PNGs, their folder, two JSON files
    for rel in ddp_files:
        if rel.suffix == ".json":
            ddp_json = json.loads((tmp_path / "export_ddp" / rel).read_text())
            single_json = json.loads((tmp_path / "export_single" / rel).read_text())
            if isinstance(ddp_json, list):  # instance results come in rank order; compare as a set
                key = lambda r: (r["image_id"], r["score"])  # noqa: E731
                ddp_json, single_json = sorted(ddp_json, key=key), sorted(single_json, key=key)
            assert ddp_json == single_json, rel
