"""Export -> ``scripts/score_coco.py`` round trip (PQ = AP = 100 for predictions built from the GT; offline scores
equal the in-memory evaluators on imperfect predictions) and clear errors for bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.data.image_io import id_to_rgb, rgb_to_id
from proscale.metrics import InstanceAPEvaluator, PanopticQualityEvaluator, SemanticSegEvaluator
from proscale.metrics.export import InstanceExporter, PanopticExporter
from proscale.structures import DatasetMeta
from proscale.testing.metrics import PairConfig, prediction_from_gt, random_pair
from proscale.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
META = DatasetMeta(
    class_names=["person", "car", "dog", "sky", "grass"],
    category_ids=[1, 3, 18, 100, 102],
    isthing=[True, True, True, False, False],
)


def load_evaluate_script():
    from proscale.tasks import score_coco

    return score_coco


EVALUATE = load_evaluate_script()


def write_gt_dataset(root: Path, gts: list[dict], meta: DatasetMeta) -> tuple[Path, Path]:
    """COCO panoptic GT on disk: <root>/gt/*.png (RGB ids) + <root>/gt.json."""
    gt_dir = root / "gt"
    gt_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id, gt in enumerate(gts, start=100):
        name = f"{image_id:06d}.png"
        Image.fromarray(id_to_rgb(gt["panoptic"].numpy())).save(gt_dir / name)
        h, w = gt["panoptic"].shape
        images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": h, "width": w})
        segments = [
            {
                "id": s["id"],
                "category_id": meta.category_ids[s["category"]],
                "iscrowd": s["iscrowd"],
                "area": int((gt["panoptic"] == s["id"]).sum()),
            }
            for s in gt["segments"]
        ]
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
    categories = [
        {"id": c, "name": n, "isthing": int(t)} for c, n, t in zip(meta.category_ids, meta.class_names, meta.isthing)
    ]
    gt_json = root / "gt.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return gt_json, gt_dir


def export(root: Path, predictions: list[dict], meta: DatasetMeta) -> tuple[Path, Path, Path]:
    pan = PanopticExporter(root / "pred", meta)
    inst = InstanceExporter(root / "pred" / "instances.json", meta)
    for image_id, pred in enumerate(predictions, start=100):
        pan.add(image_id, f"{image_id:06d}.jpg", pred)
        inst.add(image_id, pred)
    return pan.finalize(), pan.png_dir, inst.finalize()


def run_evaluate(*args: str) -> int:
    return EVALUATE.main([str(a) for a in args])


def make_split(n: int, seed: int, cfg: PairConfig | None = None) -> list[tuple[dict, dict]]:
    g = torch.Generator().manual_seed(seed)
    return [random_pair(META, 48, 64, g, cfg) for _ in range(n)]


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, (1 << 24) - 1]])
    np.testing.assert_array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        id_to_rgb(np.array([[1 << 24]]))


def test_round_trip_of_predictions_built_from_gt_scores_100(tmp_path):
    gts = [gt for _, gt in make_split(6, seed=10, cfg=PairConfig(crowd_prob=0.25))]
    preds = [prediction_from_gt(gt, META) for gt in gts]
    gt_json, gt_dir = write_gt_dataset(tmp_path, gts, META)
    pred_json, pred_dir, inst_json = export(tmp_path, preds, META)

    out = tmp_path / "pq.json"
    assert run_evaluate("--task", "panoptic", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json,
                        "--pred-dir", pred_dir, "--out", out, "--workers", "1") == 0  # fmt: skip
    pq = json.loads(out.read_text())
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert pq[key] == pytest.approx(100.0), key

    out = tmp_path / "ap.json"
    assert run_evaluate("--task", "instance", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", inst_json,
                        "--out", out) == 0  # fmt: skip
    ap = json.loads(out.read_text())
    assert set(ap) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (
        ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0) and ap["AP75"] == pytest.approx(100.0)
    )

    sem = SemanticSegEvaluator(META)
    sem.update(preds, gts)
    assert sem.compute()["mIoU"] == pytest.approx(100.0)

    written = json.loads(pred_json.read_text())
    assert {c["id"] for c in written["categories"]} == set(META.category_ids)
    seg = written["annotations"][0]["segments_info"][0]
    assert seg["category_id"] in META.category_ids and seg["area"] > 0
    assert not list(tmp_path.rglob(".*.tmp-*"))  # atomic writes leave no temp files


def test_offline_scores_equal_in_memory_evaluators(tmp_path):
    pairs = make_split(8, seed=11, cfg=PairConfig(crowd_prob=0.2))
    preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
    gt_json, gt_dir = write_gt_dataset(tmp_path, gts, META)
    pred_json, pred_dir, inst_json = export(tmp_path, preds, META)
    pq_ev, ap_ev = PanopticQualityEvaluator(META), InstanceAPEvaluator(META)
    pq_ev.update(preds, gts)
    ap_ev.update(preds, gts, image_ids=list(range(100, 108)))
    expected_pq, expected_ap = pq_ev.compute(), ap_ev.compute()
    assert 10 < expected_pq["PQ"] < 90 and 0 < expected_ap["AP"] < 100

    out = tmp_path / "pq.json"
    run_evaluate("--task", "panoptic", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json,
                 "--pred-dir", pred_dir, "--out", out, "--workers", "2")  # fmt: skip
    pq = json.loads(out.read_text())
    for group, n in pq_ev.num_classes_counted.items():  # panopticapi's "n": classes in each average
        assert pq[f"num_classes_{group}"] == n
    for key, value in expected_pq.items():
        assert pq[key] == pytest.approx(value, abs=1e-9), key
    out = tmp_path / "ap.json"
    run_evaluate("--task", "instance", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", inst_json, "--out", out)
    ap = json.loads(out.read_text())
    for key, value in expected_ap.items():
        assert (ap[key] is None and math.isnan(value)) or ap[key] == pytest.approx(value, abs=1e-9), key


def test_instance_gt_json_in_coco_instance_format(tmp_path):
    """A plain COCO instance GT (RLE segmentations, no PNGs) works the same as the panoptic-derived GT."""
    gts = [gt for _, gt in make_split(3, seed=12)]
    preds = [prediction_from_gt(gt, META) for gt in gts]
    _, _, inst_json = export(tmp_path, preds, META)
    from proscale.metrics.rle import encode_masks

    images, anns = [], []
    for image_id, gt in enumerate(gts, start=100):
        h, w = gt["panoptic"].shape
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        things = [s for s in gt["segments"] if META.isthing[s["category"]]]
        masks = torch.stack([gt["panoptic"] == s["id"] for s in things]) if things else torch.zeros(0, h, w)
        for s, rle in zip(things, encode_masks(masks)):
            cat = META.category_ids[s["category"]]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle,
                         "area": float((gt["panoptic"] == s["id"]).sum()), "iscrowd": s["iscrowd"]})  # fmt: skip
    cats = [{"id": META.category_ids[k], "name": META.class_names[k]} for k in META.thing_classes]
    gt_json = tmp_path / "instances_gt.json"
    gt_json.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    out = tmp_path / "ap.json"
    assert run_evaluate("--task", "instance", "--gt-json", gt_json, "--pred-json", inst_json, "--out", out) == 0
    assert json.loads(out.read_text())["AP"] == pytest.approx(100.0)


@pytest.fixture
def files(tmp_path):
    """A valid panoptic GT + prediction on disk (2 images), returned as paths to corrupt one at a time."""
    gts = [gt for _, gt in make_split(2, seed=13, cfg=PairConfig(crowd_prob=0.0))]
    gt_json, gt_dir = write_gt_dataset(tmp_path, gts, META)
    pred_json, pred_dir, inst_json = export(tmp_path, [prediction_from_gt(gt, META) for gt in gts], META)
    return {"gt_json": gt_json, "gt_dir": gt_dir, "pred_json": pred_json, "pred_dir": pred_dir, "inst_json": inst_json}


def panoptic_error(files, capsys) -> str:
    code = run_evaluate("--task", "panoptic", "--gt-json", files["gt_json"], "--gt-dir", files["gt_dir"],
                        "--pred-json", files["pred_json"], "--pred-dir", files["pred_dir"], "--workers", "1")  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    return err


def instance_error(files, capsys) -> str:
    code = run_evaluate("--task", "instance", "--gt-json", files["gt_json"], "--gt-dir", files["gt_dir"],
                        "--pred-json", files["inst_json"])  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    return err


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    atomic_write_json(path, data, compact=True)


def first_png(files, key: str) -> Path:
    return sorted(Path(files[key]).glob("*.png"))[0]


def test_error_missing_json(files, capsys):
    files["pred_json"].unlink()
    assert f"prediction file {files['pred_json']} does not exist" in panoptic_error(files, capsys)


def test_error_corrupt_json(files, capsys):
    files["gt_json"].write_text('{"images": [')
    assert f"GT file {files['gt_json']} is not valid JSON" in panoptic_error(files, capsys)


def test_error_missing_png(files, capsys):
    png = first_png(files, "pred_dir")
    png.unlink()
    assert f"panoptic PNG {png} does not exist" in panoptic_error(files, capsys)


def test_error_truncated_png(files, capsys):
    png = first_png(files, "gt_dir")
    png.write_bytes(png.read_bytes()[:60])
    err = panoptic_error(files, capsys)
    assert f"panoptic PNG {png} cannot be read" in err


def test_error_png_not_rgb(files, capsys):
    png = first_png(files, "pred_dir")
    Image.open(png).convert("RGBA").save(png)
    assert f"panoptic PNG {png} has mode RGBA" in panoptic_error(files, capsys)


def test_error_unknown_category_in_prediction(files, capsys):
    edit_json(files["pred_json"], lambda d: d["annotations"][0]["segments_info"][0].update(category_id=777))
    err = panoptic_error(files, capsys)
    assert str(files["pred_json"]) in err and "unknown category_id 777" in err


def test_error_json_segment_absent_from_png(files, capsys):
    def add_ghost(d):
        d["annotations"][0]["segments_info"].append({"id": 4242, "category_id": 1, "iscrowd": 0, "area": 5})

    edit_json(files["pred_json"], add_ghost)
    err = panoptic_error(files, capsys)
    assert "prediction segments [4242] are listed but have no pixel" in err and ".png" in err


def test_error_png_segment_absent_from_json(files, capsys):
    edit_json(files["pred_json"], lambda d: d["annotations"][0]["segments_info"].pop(0))
    err = panoptic_error(files, capsys)
    assert "prediction: id map contains segment ids" in err and str(first_png(files, "pred_dir")) in err


def test_error_image_without_prediction(files, capsys):
    edit_json(files["pred_json"], lambda d: d["annotations"].pop(1))
    assert f"prediction file {files['pred_json']} has no prediction for image_id 101" in panoptic_error(files, capsys)


def test_error_missing_folder(files, capsys):
    files["pred_dir"] = files["pred_dir"].parent / "nope"
    assert f"prediction PNG folder {files['pred_dir']} does not exist" in panoptic_error(files, capsys)


def test_error_instance_results_unknown_category_and_image(files, capsys):
    edit_json(files["inst_json"], lambda d: d[0].update(category_id=100))  # a stuff id: not an instance category
    err = instance_error(files, capsys)
    assert str(files["inst_json"]) in err and "unknown category_id 100" in err
    edit_json(files["inst_json"], lambda d: d[0].update(category_id=1, image_id=5))
    assert "image_id 5 is not in the GT" in instance_error(files, capsys)


def test_error_instance_mask_size(files, capsys):
    edit_json(files["inst_json"], lambda d: d[0]["segmentation"].update(size=[3, 3]))
    assert "mask size [3, 3] differs from image size [48, 64]" in instance_error(files, capsys)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -0.5, 1.5, "0.9", None])
def test_error_instance_score_not_finite_or_out_of_range(files, capsys, score):
    edit_json(files["inst_json"], lambda d: d[1].update(score=score))
    err = instance_error(files, capsys)
    assert "result #1: score must be a finite number in [0, 1]" in err and str(files["inst_json"]) in err
    assert "entry: {'image_id'" in err  # the offending entry is quoted


@pytest.mark.parametrize(
    "counts, problem",
    [
        ("garbage!!", "characters outside the RLE alphabet"),
        ("0000", "the runs cover 0 pixels, the 48x64 mask has 3072"),
        ("o", "the last run is cut off"),
        ([10, 5], "the runs cover 15 pixels"),
        ([3072, -1, 1], "a negative run length"),
    ],
)
def test_error_instance_undecodable_rle(files, capsys, counts, problem):
    edit_json(files["inst_json"], lambda d: d[0]["segmentation"].update(counts=counts))
    err = instance_error(files, capsys)
    assert "result #0: undecodable RLE counts" in err and problem in err


def test_valid_uncompressed_rle_is_accepted(files):
    from pycocotools import mask as mask_utils

    from proscale.metrics.rle import rle_counts

    def uncompress(d):
        rle = d[0]["segmentation"]
        runs = rle_counts(rle["counts"]).tolist()
        assert (
            mask_utils.frPyObjects({"size": rle["size"], "counts": runs}, *rle["size"])["counts"].decode()
            == (rle["counts"])
        )
        rle["counts"] = runs

    edit_json(files["inst_json"], uncompress)
    code = run_evaluate("--task", "instance", "--gt-json", files["gt_json"], "--gt-dir", files["gt_dir"],
                        "--pred-json", files["inst_json"])  # fmt: skip
    assert code == 0


def test_export_rejects_unlisted_ids_and_drops_empty_segments(tmp_path):
    pan_map = torch.tensor([[1, 1], [2, 0]])
    pred = {"panoptic_seg": (pan_map, [{"id": 1, "category_id": 3}, {"id": 9, "category_id": 0}])}
    with pytest.raises(ValueError, match=r"segment ids \[2\]"):
        PanopticExporter(tmp_path, META).add(1, "a.jpg", pred)
    pred = {"panoptic_seg": (pan_map, [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 0},
                                       {"id": 9, "category_id": 0}])}  # fmt: skip
    exporter = PanopticExporter(tmp_path, META)
    exporter.add(1, "a.jpg", pred)
    ann = json.loads(exporter.finalize().read_text())["annotations"][0]
    assert [(s["id"], s["category_id"], s["area"]) for s in ann["segments_info"]] == [(1, 100, 2), (2, 1, 1)]
    np.testing.assert_array_equal(rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic_pred" / "a.png"))), pan_map)
