"""The ablation table: seeds aggregated, failed and crashed jobs reported, files written."""

import json
from pathlib import Path

import pytest
import yaml

from proscale.reporting.ablation import find_job_dirs, load_job, summarize, to_markdown, write_tables


def make_job(root: Path, num: int, encoder: str, schedule, lpe: bool, seed: int, results: dict | None):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "model": {"lpe": lpe, "encoder": {"schedule": schedule} if schedule else {}}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    choices = {"hydra": {"runtime": {"choices": {"model/encoder": encoder, "model/backbone": "r18"}}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))


def ok(pq, ap=10.0, miou=20.0, gflops=5.0):
    return {
        "status": "ok",
        "PQ": pq,
        "AP": ap,
        "mIoU": miou,
        "total_gflops": gflops,
        "encoder_gflops": 2.0,
        "params": 2_000_000,
        "ms_per_img": 12.0,
    }


@pytest.fixture
def sweep(tmp_path):
    make_job(tmp_path, 0, "m2f", None, False, 1, ok(40.0))
    make_job(tmp_path, 1, "m2f", None, False, 2, ok(44.0))
    make_job(tmp_path, 2, "proscale", [1, 1, 1], True, 1, ok(30.0, gflops=3.0))
    make_job(tmp_path, 3, "proscale", [3, 3, 3], True, 1, {"status": "failed", "error": "RuntimeError: boom"})
    make_job(tmp_path, 4, "proscale", [2, 2, 2], False, 1, None)  # killed before results.json
    return tmp_path


def test_rows_aggregate_seeds_and_keep_failures(sweep):
    jobs = [load_job(d) for d in find_job_dirs(sweep)]
    assert [j.status for j in jobs] == ["ok", "ok", "ok", "failed", "failed"]
    rows = {r["model"]: r for r in summarize(jobs)}
    m2f = rows["M2F"]
    assert m2f["runs_ok"] == 2 and m2f["PQ_mean"] == pytest.approx(42.0)
    assert m2f["PQ_std"] == pytest.approx(2.8284271, rel=1e-6)
    assert m2f["params_m"] == pytest.approx(2.0)
    assert rows["PRO-SCALE (1,1,1) + LPE"]["total_gflops"] == pytest.approx(3.0)
    assert rows["PRO-SCALE (3,3,3) + LPE"]["runs_failed"] == 1
    assert "boom" in rows["PRO-SCALE (3,3,3) + LPE"]["errors"]
    assert "no results.json" in rows["PRO-SCALE (2,2,2)"]["errors"]
    text = to_markdown(list(rows.values()), "t")
    assert "42.00 ± 2.83" in text and text.count("failed") >= 2


def test_write_tables_creates_all_files(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    paths = write_tables(sweep, out)
    assert paths["csv"].read_text().count("\n") == 5  # header + 4 groups
    assert paths["plot"].stat().st_size > 1000
    assert "Failed jobs" in paths["markdown"].read_text()


def test_missing_sweep_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        find_job_dirs(tmp_path / "nope")


def test_generic_timm_backbone_is_named_by_its_model(tmp_path):
    """`model/backbone=timm` says nothing about the network: the table names the timm model instead."""
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    cfg = {"seed": 0, "model": {"lpe": True, "backbone": {"name": "timm", "model_name": "resnet18"}, "encoder": {}}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    choices = {"hydra": {"runtime": {"choices": {"model/encoder": "m2f", "model/backbone": "timm"}}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    (job / "results.json").write_text(json.dumps(ok(10.0)))
    assert load_job(job).backbone == "resnet18"
