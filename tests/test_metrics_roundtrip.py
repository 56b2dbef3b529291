"""Loader round trip on the generated dataset: panoptic PNG/JSON -> dataset ground truth -> predictions built
from it -> export -> ``scripts/score_coco.py`` (and the in-memory evaluators) scores PQ = AP = mIoU = 100."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import proscale.data.coco_panoptic as coco_panoptic  # noqa: E402  (the project's own modules: an import error must fail)
import proscale.data.synthetic as synthetic  # noqa: E402
from proscale.metrics import InstanceAPEvaluator, PanopticQualityEvaluator, SemanticSegEvaluator
from proscale.metrics.export import InstanceExporter, PanopticExporter
from proscale.testing.metrics import prediction_from_gt

ROOT = Path(__file__).resolve().parents[1]


def evaluate_main(*args) -> int:
    from proscale.tasks.score_coco import main

    return main([str(a) for a in args])


def test_generated_dataset_round_trip_scores_100(tmp_path):
    cfg = synthetic.SyntheticConfig(num_train=1, num_val=6, height=64, width=80, seed=3)
    root = synthetic.ensure_synthetic(tmp_path / "synthetic", cfg, workers=1)
    meta = synthetic.synthetic_meta()
    pan_json = root / "annotations" / "panoptic_val.json"
    dataset = coco_panoptic.CocoPanopticDataset(root / "val", root / "panoptic_val", pan_json, meta=meta, with_gt=True)
    assert len(dataset) == 6

    evaluators = [PanopticQualityEvaluator(meta), InstanceAPEvaluator(meta), SemanticSegEvaluator(meta)]
    pan_export = PanopticExporter(tmp_path / "pred", meta)
    inst_export = InstanceExporter(tmp_path / "pred" / "instances.json", meta)
    for item in dataset:
        pred = prediction_from_gt(item["gt"], meta)
        for ev in evaluators:
            ev.update([pred], [item["gt"]])
        pan_export.add(item["image_id"], item["file_name"], pred)
        inst_export.add(item["image_id"], pred)
    pq, ap, sem = (ev.compute() for ev in evaluators)
    assert (
        pq["PQ"] == pytest.approx(100.0) and pq["PQ_th"] == pytest.approx(100.0) and pq["PQ_st"] == pytest.approx(100)
    )
    assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    assert sem["mIoU"] == pytest.approx(100.0) and sem["pAcc"] == pytest.approx(100.0)

    pred_json, inst_json = pan_export.finalize(), inst_export.finalize()
    out = tmp_path / "pq.json"
    assert evaluate_main("--task", "panoptic", "--gt-json", pan_json, "--gt-dir", root / "panoptic_val",
                         "--pred-json", pred_json, "--pred-dir", pan_export.png_dir, "--out", out,
                         "--workers", "1") == 0  # fmt: skip
    offline = json.loads(out.read_text())
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert offline[key] == pytest.approx(100.0), key
    assert offline["num_classes_th"] >= 3 and offline["num_classes_st"] >= 2

    out = tmp_path / "ap.json"  # against the generator's own COCO instance file (RLE of the visible masks)
    assert evaluate_main("--task", "instance", "--gt-json", root / "annotations" / "instances_val.json",
                         "--pred-json", inst_json, "--out", out) == 0  # fmt: skip
    offline = json.loads(out.read_text())
    assert offline["AP"] == pytest.approx(100.0) and offline["AP75"] == pytest.approx(100.0)
