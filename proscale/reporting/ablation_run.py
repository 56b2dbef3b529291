"""``make ablation``: prepare once, train the grid in parallel lanes, time every configuration, write the table.

1. Preparation, once, in this process, before any lane starts: every distinct dataset of the grid is generated
   and every distinct backbone pre-training (``pretrain=semantic``) is run or found in its cache
   (``data/pretrained_backbones``). The lanes then only read the caches, so no two processes ever pre-train the
   same backbone (the pre-training also holds a file lock, for lanes started by hand).
2. Training: the grid (the preset's ``hydra.sweeper.params`` and the command line's sweeps) split into ``lanes``
   balanced ``scripts/train.py -m`` processes (:mod:`proscale.reporting.lanes`), each with
   ``max(1, cores // lanes)`` torch threads and ``OMP_WAIT_POLICY=PASSIVE``, all under one sweep folder.
   ``lanes=1`` is the plain sequential multirun (the sweep folder holds the jobs directly).
3. Timing: one model per configuration, timed round-robin in this process alone at the run size and at the paper's
   800x1088 (:mod:`proscale.reporting.inference_timing`), settings from the preset's ``ablation.timing``.
4. The table, CSV and PQ-vs-GFLOPs plot in the sweep folder (:func:`proscale.reporting.ablation.write_tables`).

``ablation_run.json`` in the sweep folder records the lanes (commands, value groups, start / end times, exit
status), the preparation and the wall time of each phase.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from proscale.reporting.lanes import LANE_KEYS, Grid, Lane, Split, lane_overrides, run_lanes, split_grid, sweep_grid

MANIFEST_FILENAME = "ablation_run.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
TIMING_DEFAULTS = {"warmup": 2, "repeats": 10, "threads": 1, "paper_size": [800, 1088]}


_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def _compose(overrides: list[str]) -> DictConfig:
    """The job config of ``overrides`` (cached: the cost estimate and the preparation both need every job's);
    a copy, so a caller's changes (the pre-trained backbone's path) stay its own."""
    from proscale.utils.hydra_utils import compose_config

    key = tuple(overrides)
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_config("train", overrides)
    return copy.deepcopy(_COMPOSED[key])


def _split_user_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(overrides for the grid, {lane key: value}) -- the keys the lanes set themselves are taken out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept, taken = [], {}
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(list(overrides))):
        if parsed.key_or_group in LANE_KEYS:
            taken[parsed.key_or_group] = str(parsed.value())
        else:
            kept.append(text)
    return kept, taken


def plan(overrides: list[str]) -> tuple[Grid, DictConfig, Path]:
    """(grid, the first job's config, sweep folder) for the command-line ``overrides``."""
    grid_overrides, taken = _split_user_overrides(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o.input_line for o in OverridesParser.create().parse_overrides(grid_overrides) if not o.is_sweep_override()]
    base = _compose(plain)
    params = OmegaConf.to_container(base.hydra.sweeper.params, resolve=False) if base.hydra.sweeper.get("params") else {}
    grid = sweep_grid({k: str(v) for k, v in (params or {}).items()}, grid_overrides)
    first = _compose(grid.job_overrides(grid.jobs()[0])) if grid.axes else base
    sweep_dir = Path(taken.get("hydra.sweep.dir") or str(base.hydra.sweep.dir)).resolve()
    return grid, first, sweep_dir


class JobCosts:
    """Estimated work of a job: the total GFLOPs of its model at its training size, counted on the meta device
    (one count per distinct model config). Only the ratios matter: they balance the lanes."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self._by_model: dict[str, float] = {}

    def __call__(self, job: dict[str, str]) -> float:
        import torch
        from hydra.utils import instantiate

        from proscale.analysis.flops import count_flops

        cfg = _compose(self.grid.job_overrides(job))
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        size = tuple(cfg.callbacks.compute_stats.image_size or (800, 1088))
        key = json.dumps([model_cfg, size], sort_keys=True, default=str)
        if key not in self._by_model:
            model_cfg["num_classes"] = model_cfg.get("num_classes") or 10
            if isinstance(model_cfg.get("backbone"), dict):
                model_cfg["backbone"]["pretrained"] = None
            with torch.device("meta"):
                model = instantiate(model_cfg)
            self._by_model[key] = float(count_flops(model, image_size=size, orig_size=size)["total"])
        return self._by_model[key]


def prepare(grid: Grid, threads: int) -> list[dict[str, Any]]:
    """Generate every distinct dataset and pre-train every distinct backbone of the grid, one after another."""
    import hydra
    import torch

    from proscale.tasks.run import maybe_pretrain_backbone

    torch.set_num_threads(max(1, threads))
    done_data: set[str] = set()
    done_pretrain: set[str] = set()
    log = []
    for job in grid.jobs() or [{}]:
        cfg = _compose(grid.job_overrides(job))
        data_key = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True, default=str)
        if data_key not in done_data:
            start = time.perf_counter()
            hydra.utils.instantiate(cfg.data).prepare_data()
            done_data.add(data_key)
            log.append({"step": "data", "root": str(cfg.data.get("root")), "wall_s": time.perf_counter() - start})
        start = time.perf_counter()
        info = maybe_pretrain_backbone(cfg)  # cached after the first job that needs this backbone
        if info is not None and info["path"] not in done_pretrain:
            done_pretrain.add(info["path"])
            log.append(
                {"step": "pretrain", "path": info["path"], "cached": info["cached"], "wall_s": time.perf_counter() - start}
            )
    return log


def lane_plan(grid: Grid, split: Split, sweep_dir: Path, threads: int, passive: bool, user_threads: bool) -> list[Lane]:
    lanes = []
    for index in range(split.lanes):
        lane_dir = sweep_dir if split.lanes == 1 else sweep_dir / f"lane{index}"
        overrides = lane_overrides(grid, split, index) + [f"hydra.sweep.dir={lane_dir}"]
        if not user_threads:
            overrides.append(f"num_threads={threads}")
        env = {"OMP_NUM_THREADS": str(threads)}
        if passive:
            env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"
            if env["OMP_WAIT_POLICY"].lower() == "default":
                env["OMP_WAIT_POLICY"] = "PASSIVE"  # `make`'s dedicated-machine default does not fit side-by-side lanes
        command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "-m", *overrides]
        lanes.append(Lane(command=command, log_path=sweep_dir / f"lane{index}.log", env=env))
    return lanes


def _say(message: str) -> None:
    print(f"[ablation] {message}", flush=True)


def run_ablation(overrides: list[str], lanes: int = 2, time_models: bool = True) -> int:
    """The whole pipeline (module docstring); returns the exit status (1 when a job failed, 0 otherwise)."""
    from proscale.reporting.ablation import find_job_dirs, load_job, write_tables
    from proscale.reporting.inference_timing import time_configurations, write_timing

    started = time.perf_counter()
    grid, first, sweep_dir = plan(list(overrides))
    ablation_cfg = OmegaConf.to_container(first.get("ablation") or OmegaConf.create({}), resolve=True)
    smoke = bool(ablation_cfg.get("smoke_run", False))
    if smoke:
        _say("SMOKE RUN: a pipeline check on a tiny dataset; its numbers mean nothing")
    cores = os.cpu_count() or 1
    jobs = grid.jobs()
    split = split_grid(grid, lanes, JobCosts(grid) if lanes > 1 else (lambda job: 1.0))
    threads = max(1, cores // split.lanes)
    user_threads = any(o.split("=", 1)[0] == "num_threads" for o in overrides)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "overrides": list(overrides),
        "jobs": len(jobs),
        "lanes_requested": lanes,
        "split_axis": split.axis.key if split.axis else None,
        "smoke_run": smoke,
    }
    _say(f"sweep folder {sweep_dir}: {len(jobs)} jobs over {', '.join(a.key for a in grid.axes) or 'no axis'}")

    phase = time.perf_counter()
    manifest["preparation"] = prepare(grid, threads=cores)
    manifest["preparation_wall_s"] = time.perf_counter() - phase
    _say(f"preparation done in {manifest['preparation_wall_s']:.0f} s (data + backbone pre-training, cached)")

    plan_lanes = lane_plan(grid, split, sweep_dir, threads, passive=split.lanes > 1, user_threads=user_threads)
    for index, lane in enumerate(plan_lanes):
        group = f"{split.axis.key}={','.join(split.groups[index])}" if split.axis else "the whole grid"
        _say(f"lane {index}: {group} ({threads} thread(s)), log {lane.log_path}")
    phase = time.perf_counter()
    run_lanes(plan_lanes)
    manifest["training_wall_s"] = time.perf_counter() - phase
    manifest["lanes"] = [
        {
            "command": lane.command,
            "env": lane.env,
            "group": list(split.groups[i]) if split.axis else None,
            "estimated_cost": split.costs[i],
            "started": lane.started,
            "ended": lane.ended,
            "returncode": lane.returncode,
            "log": str(lane.log_path),
        }
        for i, lane in enumerate(plan_lanes)
    ]
    for index, lane in enumerate(plan_lanes):
        _say(f"lane {index} ended with status {lane.returncode} after {lane.ended - lane.started:.0f} s")
        if lane.returncode:
            tail = lane.log_path.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"    {line}" for line in tail), file=sys.stderr)

    if time_models:
        timing_cfg = {**TIMING_DEFAULTS, **(ablation_cfg.get("timing") or {})}
        run_size = list(first.callbacks.compute_stats.image_size or timing_cfg["paper_size"])
        sizes = [run_size] + ([timing_cfg["paper_size"]] if list(timing_cfg["paper_size"]) != run_size else [])
        finished = [load_job(d) for d in find_job_dirs(sweep_dir)]
        _say(
            f"timing {len({j.group_key for j in finished})} configurations round-robin at "
            f"{' and '.join('x'.join(map(str, s)) for s in sizes)} ({timing_cfg['repeats']} rounds)"
        )
        phase = time.perf_counter()
        payload = time_configurations(
            finished, sizes, warmup=int(timing_cfg["warmup"]), repeats=int(timing_cfg["repeats"]),
            threads=int(timing_cfg["threads"]),
        )
        write_timing(sweep_dir, payload)
        manifest["timing_wall_s"] = time.perf_counter() - phase

    paths = write_tables(sweep_dir)
    manifest["wall_s"] = time.perf_counter() - started
    from proscale.utils.io import atomic_write_json

    atomic_write_json(sweep_dir / MANIFEST_FILENAME, manifest)
    print(paths["markdown"].read_text(), flush=True)
    for kind, path in paths.items():
        _say(f"{kind:>8}: {path}")
    if smoke:
        _say("SMOKE RUN finished: the table and plot above check the pipeline, their numbers mean nothing")
    _say(f"done in {manifest['wall_s']:.0f} s")
    return 1 if any(lane.returncode for lane in plan_lanes) else 0


__all__ = ["MANIFEST_FILENAME", "JobCosts", "lane_plan", "plan", "prepare", "run_ablation"]
