"""The ablation table: seeds aggregated, failed and crashed jobs reported, files written."""

import json
import math
from pathlib import Path

import pytest
import yaml

from proscale.reporting.ablation import find_job_dirs, load_job, summarize, to_csv, to_markdown, write_tables


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


def test_single_runs_show_no_spread_and_the_difference_has_no_interval(tmp_path):
    make_job(tmp_path, 0, "m2f", None, False, 0, ok(40.0))
    make_job(tmp_path, 1, "proscale", [3, 3, 3], True, 0, ok(38.5))
    rows = summarize([load_job(d) for d in find_job_dirs(tmp_path)], paper_size=False)
    text = to_markdown(rows, "t")
    assert "± 0.00" not in text and "± -" not in text and "nan" not in text
    assert "| 40.00 |" in text and "| 38.50 |" in text
    assert "-1.50 (no interval: < 2 runs)" in text and "(reference)" in text


def test_difference_to_m2f_uses_welch_interval_on_hand_made_seeds(tmp_path):
    """M2F PQ 40, 42, 44 vs PRO-SCALE 39, 40, 41: difference -2; Welch's interval by hand: the standard error is
    sqrt(4/3 + 1/3) = 1.29099, the degrees of freedom (5/3)^2 / ((4/3)^2/2 + (1/3)^2/2) = 2.94118, and
    t(0.975, 2.94118) = 3.21876 (scipy.stats.t.ppf), so -2 -+ 4.15540."""
    for i, pq in enumerate((40.0, 42.0, 44.0)):
        make_job(tmp_path, i, "m2f", None, False, i, ok(pq))
    for i, pq in enumerate((39.0, 40.0, 41.0)):
        make_job(tmp_path, 3 + i, "proscale", [1, 1, 1], False, i, ok(pq))
    rows = {r["model"]: r for r in summarize([load_job(d) for d in find_job_dirs(tmp_path)], paper_size=False)}
    row = rows["PRO-SCALE (1,1,1)"]
    assert row["PQ_mean"] == pytest.approx(40.0) and row["PQ_std"] == pytest.approx(1.0)
    assert row["dPQ"] == pytest.approx(-2.0)
    assert row["dPQ_low"] == pytest.approx(-2.0 - 4.15540, abs=2e-4)
    assert row["dPQ_high"] == pytest.approx(-2.0 + 4.15540, abs=2e-4)
    assert "-2.00 [-6.16, +2.16]" in to_markdown(list(rows.values()), "t")


def test_welch_difference_edge_cases():
    from proscale.reporting.stats import welch_difference

    same = welch_difference([3.0, 3.0], [1.0, 1.0])
    assert (same.value, same.low, same.high) == (2.0, 2.0, 2.0)
    assert math.isnan(welch_difference([], [1.0]).value)


def test_table_header_states_sizes_and_units(tmp_path):
    make_job(tmp_path, 0, "m2f", None, False, 0, ok(40.0, gflops=0.2046))
    cfg = yaml.safe_load((tmp_path / "0" / ".hydra" / "config.yaml").read_text())
    cfg["callbacks"] = {"compute_stats": {"image_size": [128, 160]}}
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = to_markdown(summarize([load_job(d) for d in find_job_dirs(tmp_path)], paper_size=False), "t")
    assert "total GFLOPs @ 128x160" in text and "GFLOPs @ 800x1088" in text and "ms/img @ 128x160" in text
    assert "| 0.205 |" in text  # three significant figures, not two decimals
    assert "one multiply-add = one FLOP" in text


def test_paper_size_gflops_rebuilds_the_jobs_model():
    """The 800x1088 columns come from the job's own model config, counted on the meta device."""
    from omegaconf import OmegaConf

    from proscale.analysis.flop_table import compose_model_config
    from proscale.reporting.ablation import paper_size_gflops

    cfg = OmegaConf.to_container(compose_model_config(["experiment=tiny"]), resolve=True)
    small = paper_size_gflops(cfg, size=(64, 64))
    large = paper_size_gflops(cfg)
    assert 0 < small["encoder_gflops"] < small["total_gflops"]
    # the encoder's cost grows with the token count: 800x1088 has 212.5x the pixels of 64x64
    assert large["encoder_gflops"] / small["encoder_gflops"] == pytest.approx(212.5, rel=0.05)
    assert paper_size_gflops({"no": "target"}) == {}


@pytest.mark.parametrize("case", ["all_zero", "single_run", "all_failed"])
def test_plot_edge_cases(tmp_path, case):
    from proscale.reporting.ablation import plot_pq_vs_gflops

    sweep = tmp_path / "sweep"
    if case == "all_zero":
        make_job(sweep, 0, "m2f", None, False, 0, ok(0.0))
        make_job(sweep, 1, "m2f", None, False, 1, ok(0.0))
        make_job(sweep, 2, "proscale", [1, 1, 1], True, 0, ok(0.0, gflops=3.0))
    elif case == "single_run":
        make_job(sweep, 0, "m2f", None, False, 0, ok(35.0))
    else:
        make_job(sweep, 0, "m2f", None, False, 0, {"status": "failed", "error": "boom"})
        make_job(sweep, 1, "proscale", [1, 1, 1], False, 0, None)
    rows = summarize([load_job(d) for d in find_job_dirs(sweep)], paper_size=False)
    path = tmp_path / "plot.png"
    (panel,) = plot_pq_vs_gflops(rows, path)
    assert path.stat().st_size > 1000
    if case == "all_failed":
        assert panel["points"] == 0 and "nothing to plot" in panel["message"] and "2 failed" in panel["message"]
        return
    low, high = panel["ylim"]
    assert low == 0 and high >= 1.0  # never a negative PQ axis, even when every value is 0
    assert "GFLOPs" in panel["xlabel"] and "FLOP" in panel["xlabel"]
    assert panel["points"] == (2 if case == "all_zero" else 1)
    if case == "single_run":
        assert high == pytest.approx(35.0 * 1.1)


def timing_payload(ms: dict[tuple, tuple[float, float]]) -> dict:
    """inference_timing.json by hand: {(backbone, encoder, schedule, lpe): (ms at 128x160, ms at 800x1088)}."""
    return {
        "threads": 1,
        "cpu_cores": 2,
        "warmup": 2,
        "repeats": 10,
        "sizes": ["128x160", "800x1088"],
        "date_utc": "2026-12-03 12:00 UTC",
        "load_average_before": [1.25, 1.5, 1.75],
        "load_average_after": [1.0, 1.5, 1.75],
        "configs": [
            {"key": list(key), "label": "-", "source": "x.ckpt", "median_ms": {"128x160": a, "800x1088": b}}
            for key, (a, b) in ms.items()
        ],
    }


def _sized_sweep(tmp_path):
    make_job(tmp_path, 0, "m2f", None, False, 0, ok(40.0))
    make_job(tmp_path, 1, "proscale", [1, 1, 1], False, 0, ok(38.0))
    make_job(tmp_path, 2, "proscale", [3, 3, 3], False, 0, ok(39.0))
    for job in ("0", "1", "2"):
        path = tmp_path / job / ".hydra" / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        cfg["callbacks"] = {"compute_stats": {"image_size": [128, 160]}}
        path.write_text(yaml.safe_dump(cfg))
    return summarize([load_job(d) for d in find_job_dirs(tmp_path)], paper_size=False)


def test_round_robin_timing_columns_note_and_inversion_sentence(tmp_path):
    """(1,1,1): slower than M2F at 128x160 (30 vs 25 ms) but faster at 800x1088 (400 vs 900 ms): one generated
    sentence. (3,3,3): slower at both sizes: no sentence."""
    rows = _sized_sweep(tmp_path)
    timing = timing_payload(
        {
            ("r18", "m2f", "-", False): (25.0, 900.0),
            ("r18", "proscale", "(1,1,1)", False): (30.0, 400.0),
            ("r18", "proscale", "(3,3,3)", False): (31.0, 950.0),
        }
    )
    text = to_markdown(rows, "t", timing=timing)
    assert "ms/img @ 128x160 | ms/img @ 800x1088 |" in text and "(per job)" not in text
    assert "| 30.0 | 400.0 |" in text and "| 25.0 | 900.0 |" in text
    assert "round-robin (warm-up 2, 10 rounds" in text and "1 torch thread(s) on a 2-core machine" in text
    assert "load average (1, 5, 15 min) before timing 1.25, 1.50, 1.75" in text
    inversions = [line for line in text.splitlines() if line.startswith("- ") and "slower than M2F" in line]
    assert len(inversions) == 1 and inversions[0].startswith("- PRO-SCALE (1,1,1) (r18) is slower than M2F at 128x160")
    assert "(30.0 vs 25.0 ms) but faster at 800x1088 (400.0 vs 900.0 ms)" in inversions[0]
    csv_text = to_csv(rows)
    assert "timed_ms_128x160" in csv_text.splitlines()[0]


def test_without_timing_the_per_job_column_is_marked_not_comparable(tmp_path):
    text = to_markdown(_sized_sweep(tmp_path), "t")
    assert "ms/img @ 128x160 (per job)" in text and "not comparable" in text and "800x1088 |" in text


def test_smoke_run_is_said_in_the_title_and_the_files(tmp_path):
    make_job(tmp_path / "sweep", 0, "m2f", None, False, 0, ok(1.0))
    path = tmp_path / "sweep" / "0" / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["ablation"] = {"smoke_run": True}
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "sweep" / "inference_timing.json").write_text(
        json.dumps(timing_payload({("r18", "m2f", "-", False): (5.0, 50.0)}))
    )
    paths = write_tables(tmp_path / "sweep", paper_size=False)
    text = paths["markdown"].read_text()
    assert text.startswith("# SMOKE RUN (numbers mean nothing)") and "**SMOKE RUN**" in text
    assert "round-robin" in text  # the sweep's inference_timing.json was read
    plain = to_markdown(summarize([load_job(d) for d in find_job_dirs(tmp_path / "sweep")], paper_size=False), "t")
    assert "SMOKE" not in plain


def test_plot_marks_schedules_and_colours_lpe(tmp_path):
    from proscale.reporting.ablation import LPE_STYLE, SCHEDULE_MARKERS, plot_pq_vs_gflops

    for i, (encoder, schedule, lpe) in enumerate(
        [("m2f", None, False), ("proscale", [1, 1, 1], False), ("proscale", [1, 1, 1], True), ("proscale", [3, 3, 3], True)]
    ):
        for seed in (0, 1):
            make_job(tmp_path / "s", 2 * i + seed, encoder, schedule, lpe, seed, ok(30.0 + i + 2 * seed))
    rows = summarize([load_job(d) for d in find_job_dirs(tmp_path / "s")], paper_size=False)
    (panel,) = plot_pq_vs_gflops(rows, tmp_path / "p.png", smoke_run=True)
    points = {(p["schedule"], p["lpe"]): p for p in panel["series"]}
    assert len(points) == 4
    assert points[("-", False)]["marker"] == SCHEDULE_MARKERS["-"] != points[("(1,1,1)", False)]["marker"]
    assert points[("(1,1,1)", False)]["marker"] == points[("(1,1,1)", True)]["marker"]
    assert points[("(1,1,1)", False)]["colour"] == LPE_STYLE[False][0] != points[("(1,1,1)", True)]["colour"]
    # error bar = sample std of the two seeds (30 + i and 32 + i): sqrt(2)
    assert points[("(3,3,3)", True)]["yerr"] == pytest.approx(math.sqrt(2.0))
    assert points[("(3,3,3)", True)]["y"] == pytest.approx(34.0)
    assert "encoder GFLOPs per image @ run size" in panel["xlabel"]
