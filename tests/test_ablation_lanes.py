"""The ablation pipeline's machinery: the grid and its split into lanes, lanes really running side by side, the
lane commands, the presets, the shared pre-training (seed, lock), and a tiny end-to-end run (slow)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from proscale.reporting.lanes import Axis, Grid, Lane, Split, lane_overrides, run_lanes, split_grid, sweep_grid

PRESET_PARAMS = {"variant": "m2f,p111,p222,p333", "model.lpe": "false,true", "seed": "0,1,2"}
# hand-made work per job: M2F the slowest, (1,1,1) the fastest, LPE adds a little
VARIANT_COST = {"m2f": 4.0, "p111": 1.0, "p222": 2.0, "p333": 3.0}


def hand_made_cost(job: dict[str, str]) -> float:
    return VARIANT_COST[job["variant"]] + (0.5 if job["model.lpe"] == "True" else 0.0)


def test_grid_takes_the_presets_axes_and_the_command_line_wins():
    grid = sweep_grid(PRESET_PARAMS, ["experiment=cpu_ablation", "seed=0,1", "steps=5"])
    assert grid.fixed == ("experiment=cpu_ablation", "steps=5")
    assert [(a.key, a.values) for a in grid.axes] == [
        ("variant", ("m2f", "p111", "p222", "p333")),
        ("model.lpe", ("False", "True")),  # Hydra's string form of the booleans
        ("seed", ("0", "1")),
    ]
    jobs = grid.jobs()
    assert len(jobs) == 16 and jobs[0] == {"variant": "m2f", "model.lpe": "False", "seed": "0"}
    assert grid.job_overrides(jobs[-1]) == ["experiment=cpu_ablation", "steps=5", "variant=p333", "model.lpe=True", "seed=1"]
    # a single value in the preset is a fixed override, not an axis; ranges expand
    grid = sweep_grid({"seed": "0"}, ["steps=range(1,4)"])
    assert grid.fixed == ("seed=0",) and grid.axes == (Axis("steps", ("1", "2", "3")),)


def test_split_balances_the_estimated_work_of_the_two_lanes():
    """Per seed: LPE split 10 vs 12; variant split {m2f, p111} 11 vs {p222, p333} 11: the variant split wins."""
    grid = sweep_grid(PRESET_PARAMS, [])
    split = split_grid(grid, 2, hand_made_cost)
    assert split.axis.key == "variant"
    assert split.groups == (("m2f", "p111"), ("p222", "p333"))
    assert split.costs == pytest.approx((33.0, 33.0))
    assert lane_overrides(grid, split, 1) == ["variant=p222,p333", "model.lpe=False,True", "seed=0,1,2"]
    # without LPE's extra cost, splitting by LPE would balance as well: the first best axis is kept
    even = split_grid(grid, 2, lambda job: VARIANT_COST[job["variant"]])
    assert even.axis.key == "variant" and max(even.costs) == pytest.approx(30.0)


def test_split_edge_cases():
    grid = sweep_grid(PRESET_PARAMS, [])
    one = split_grid(grid, 1, hand_made_cost)
    assert one.axis is None and one.lanes == 1
    assert lane_overrides(grid, one, 0) == ["variant=m2f,p111,p222,p333", "model.lpe=False,True", "seed=0,1,2"]
    # more lanes than any axis has values: as many lanes as the best axis allows
    small = sweep_grid({"model.lpe": "false,true", "seed": "0"}, [])
    split = split_grid(small, 4, lambda job: 1.0)
    assert split.axis.key == "model.lpe" and split.lanes == 2
    # nothing swept: one lane
    assert split_grid(sweep_grid({}, ["steps=3"]), 2, lambda job: 1.0).lanes == 1
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        split_grid(grid, 0, hand_made_cost)


def test_lanes_really_run_side_by_side(tmp_path):
    """Two 1-second lanes: both start before either ends, and together they take well under 2 seconds."""
    script = "import time, sys; time.sleep(1.0); print('done', sys.argv[1])"
    lanes = [Lane([sys.executable, "-c", script, str(i)], tmp_path / f"lane{i}.log") for i in range(2)]
    start = time.time()
    run_lanes(lanes)
    wall = time.time() - start
    assert [lane.returncode for lane in lanes] == [0, 0]
    assert max(lane.started for lane in lanes) < min(lane.ended for lane in lanes)
    assert wall < 1.9, wall
    assert (tmp_path / "lane1.log").read_text().strip() == "done 1"


def test_lane_commands_threads_environment_and_folders(tmp_path):
    from proscale.reporting.ablation_run import lane_plan

    grid = Grid(("experiment=cpu_ablation",), (Axis("variant", ("m2f", "p111")), Axis("seed", ("0", "1"))))
    two = lane_plan(grid, Split(grid.axes[0], (("m2f",), ("p111",)), (1.0, 1.0)), tmp_path, 1, True, False)
    assert len(two) == 2
    assert two[0].command[2:] == [
        "-m",
        "experiment=cpu_ablation",
        "variant=m2f",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'lane0'}",
        "num_threads=1",
    ]
    assert "variant=p111" in two[1].command and f"hydra.sweep.dir={tmp_path / 'lane1'}" in two[1].command
    assert two[0].env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert two[0].command[1].endswith("scripts/train.py") and two[0].log_path == tmp_path / "lane0.log"
    one = lane_plan(grid, Split(None, ((),), (4.0,)), tmp_path, 2, False, True)
    assert len(one) == 1 and f"hydra.sweep.dir={tmp_path}" in one[0].command
    assert not any(c.startswith("num_threads=") for c in one[0].command)  # the user's own num_threads stays
    assert "variant=m2f,p111" in one[0].command and "OMP_WAIT_POLICY" not in one[0].env


def test_presets_make_the_grids_the_pipeline_expects():
    from proscale.reporting.ablation_run import plan

    grid, first, sweep_dir = plan(["experiment=cpu_ablation"])
    assert len(grid.jobs()) == 24 and {a.key for a in grid.axes} == {"variant", "model.lpe", "seed"}
    assert first.pretrain.seed == 0 and first.callbacks.compute_stats.timing_runs == 0
    assert first.ablation.smoke_run is False and list(first.ablation.timing.paper_size) == [800, 1088]
    assert "cpu_ablation" in str(sweep_dir)
    grid, first, sweep_dir = plan(["experiment=cpu_ablation_quick", "hydra.sweep.dir=/tmp/x"])
    assert len(grid.jobs()) == 8 and first.ablation.smoke_run is True
    assert first.steps == 10 and first.data.num_train == 64 and str(first.data.root).endswith("synthetic_quick")
    assert sweep_dir == Path("/tmp/x") and not any("hydra.sweep.dir" in o for o in grid.fixed)


def test_seeds_share_one_pretrained_backbone_when_pretrain_seed_is_set():
    from proscale.lightning.backbone_pretrain import _cache_key, pretrain_seed
    from proscale.utils.hydra_utils import compose_config

    keys = {}
    for seed in (0, 1):
        cfg = compose_config("train", ["experiment=cpu_ablation", f"seed={seed}"])
        assert pretrain_seed(cfg) == 0
        keys[seed] = _cache_key(cfg)
    assert keys[0] == keys[1]
    own = [_cache_key(compose_config("train", ["experiment=cpu_synthetic", f"seed={s}"])) for s in (0, 1)]
    assert own[0] != own[1]  # without pretrain.seed each seed pre-trains its own, as before
    assert own[0] == keys[0]  # and seed 0's entry is the one cpu_synthetic already caches


def test_exclusive_lock_makes_a_second_holder_wait(tmp_path):
    from proscale.utils.io import exclusive_lock

    events = []

    def second():
        with exclusive_lock(tmp_path / "x.lock"):
            events.append("second")

    with exclusive_lock(tmp_path / "x.lock"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        events.append("first done")
    thread.join(timeout=10)
    assert events == ["first done", "second"]


def test_latest_sweep_names_the_sweep_above_its_lanes(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        from make_tables import latest_sweep
    finally:
        sys.path.pop(0)
    sweep = tmp_path / "multiruns" / "x" / "2026"
    for lane in ("lane0", "lane1"):
        (sweep / lane).mkdir(parents=True)
        (sweep / lane / "multirun.yaml").write_text("{}")
        (sweep / f"{lane}.log").write_text("")
    assert latest_sweep((str(tmp_path / "multiruns"),)) == sweep


def test_tiny_ablation_end_to_end_in_two_lanes(tmp_path):
    """2 configurations x 2 steps on a 4-image dataset, in 2 lanes: one sweep folder with both jobs, the timing and
    the table with both ms/img columns."""
    from proscale.reporting.ablation_run import run_ablation

    sweep = tmp_path / "sweep"
    status = run_ablation(
        [
            "experiment=tiny",
            "steps=2",
            "data.num_train=4",
            "data.num_val=2",
            "model/encoder=m2f,proscale",
            "trainer.enable_progress_bar=false",
            "logger=csv",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={sweep}",
            "+ablation.timing.repeats=2",
            "+ablation.timing.warmup=1",
            "+ablation.timing.paper_size=[96,128]",
        ],
        lanes=2,
    )
    assert status == 0
    manifest = json.loads((sweep / "ablation_run.json").read_text())
    lanes = manifest["lanes"]
    assert len(lanes) == 2 and max(lane["started"] for lane in lanes) < min(lane["ended"] for lane in lanes)
    results = sorted(sweep.glob("lane*/*/results.json"))
    assert len(results) == 2 and all(json.loads(p.read_text())["status"] == "ok" for p in results)
    timing = json.loads((sweep / "inference_timing.json").read_text())
    assert timing["sizes"] == ["64x64", "96x128"] and len(timing["configs"]) == 2
    assert all(c["source"].endswith(".ckpt") for c in timing["configs"])
    table = (sweep / "ablation.md").read_text()
    assert "ms/img @ 64x64" in table and "ms/img @ 96x128" in table and "round-robin" in table
    assert (sweep / "pq_vs_gflops.png").stat().st_size > 1000


def test_ablation_script_takes_options_between_the_overrides():
    """`make ablation ARGS="--no-timing steps=5"` puts the option after the Makefile's experiment=...: accepted."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "ablation.py"
    spec = importlib.util.spec_from_file_location("proscale_scripts_ablation", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["experiment=cpu_ablation", "--no-timing", "steps=5", "--lanes", "1", "seed=0,1"])
    assert args.overrides == ["experiment=cpu_ablation", "steps=5", "seed=0,1"]
    assert args.no_timing is True and args.lanes == 1
    assert module.parse_args(["experiment=cpu_ablation"]).no_timing is False
    with pytest.raises(SystemExit):
        module.parse_args(["--lanes", "0", "experiment=cpu_ablation"])
