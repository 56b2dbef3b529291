"""A Hydra sweep split into parallel lanes: each lane one ``scripts/train.py -m`` process over part of the grid.

Small CPU models train faster as two 1-thread processes than as one 2-thread process (the per-step overhead does not
parallelise), and Hydra's basic launcher runs jobs one after another; submitit's local executor starts every job at
once with no cap. So the grid is cut along one swept axis into as many value groups as there are lanes, and each
lane runs Hydra's ordinary multirun over its group: every job keeps its Hydra record (``.hydra/``, overrides) and
its ``results.json``, under ``<sweep dir>/lane<k>/<job num>`` of one sweep folder.

The axis and the grouping are chosen to balance the lanes' estimated work (the sum of a per-job cost, e.g. the
model's GFLOPs): the split with the smallest largest lane wins. An axis whose values do not change the cost much
(LPE off / on) gives each lane the same mix of models and therefore the best balance.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

# overrides the lanes set themselves: taken out of the user's overrides (their values are used)
LANE_KEYS = ("hydra.sweep.dir",)


@dataclass(frozen=True)
class Axis:
    """One swept key: ``key`` as written on the command line (``variant``, ``model.lpe``, ``+x``) and its values
    as override strings, in sweep order."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """A sweep: ``fixed`` overrides shared by every job, the swept ``axes``, and the jobs they make."""

    fixed: tuple[str, ...]
    axes: tuple[Axis, ...]

    def jobs(self) -> list[dict[str, str]]:
        """Every job as ``{axis key: value}``, in Hydra's order (the last axis varies fastest)."""
        return [dict(zip((a.key for a in self.axes), combo)) for combo in itertools.product(*(a.values for a in self.axes))]

    def job_overrides(self, job: Mapping[str, str]) -> list[str]:
        return [*self.fixed, *(f"{key}={value}" for key, value in job.items())]


def sweep_grid(config_params: Mapping[str, str] | None, overrides: Sequence[str]) -> Grid:
    """The grid of ``hydra.sweeper.params`` (from the composed config) and command-line ``overrides``; a command-line
    override of the same key wins, as in Hydra's basic sweeper. Range and choice sweeps expand; glob sweeps are refused."""
    parser = OverridesParser.create()
    given = parser.parse_overrides(list(overrides))
    given_keys = {o.key_or_group for o in given}
    fixed: list[str] = []
    axes: list[Axis] = []
    params = [f"{key}={value}" for key, value in (config_params or {}).items()]
    for override in [*(o for o in parser.parse_overrides(params) if o.key_or_group not in given_keys), *given]:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        try:
            values = tuple(override.sweep_string_iterator())
        except Exception as error:  # glob sweeps need the config's group options
            raise ValueError(f"sweep override {override.input_line!r} cannot be split into lanes: {error}") from error
        axes.append(Axis(override.get_key_element(), values))
    return Grid(tuple(fixed), tuple(axes))


@dataclass(frozen=True)
class Split:
    """The grid cut along ``axis`` (None: not cut, one lane) into per-lane value groups and their estimated costs."""

    axis: Axis | None
    groups: tuple[tuple[str, ...], ...]
    costs: tuple[float, ...]

    @property
    def lanes(self) -> int:
        return len(self.groups)


def split_grid(grid: Grid, lanes: int, job_cost: Callable[[dict[str, str]], float]) -> Split:
    """Cut ``grid`` along the axis whose value groups (at most ``lanes``, greedy: the costliest value goes to the
    least loaded lane) give the smallest largest lane cost; ties keep the first such axis."""
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    jobs = grid.jobs()
    costs = [float(job_cost(job)) for job in jobs]
    total = sum(costs)
    best = Split(None, ((),), (total,))
    if lanes == 1:
        return best
    for axis in grid.axes:
        if len(axis.values) < 2:
            continue
        per_value = {v: sum(c for job, c in zip(jobs, costs) if job[axis.key] == v) for v in axis.values}
        count = min(lanes, len(axis.values))
        groups: list[list[str]] = [[] for _ in range(count)]
        loads = [0.0] * count
        for value in sorted(axis.values, key=lambda v: -per_value[v]):
            lane = loads.index(min(loads))
            groups[lane].append(value)
            loads[lane] += per_value[value]
        ordered = tuple(tuple(v for v in axis.values if v in group) for group in groups)  # keep the sweep order
        if max(loads) < max(best.costs) - 1e-9 * max(total, 1.0):
            best = Split(axis, ordered, tuple(loads))
    return best


def lane_overrides(grid: Grid, split: Split, lane: int) -> list[str]:
    """The overrides of one lane's ``-m`` run: the grid's own, with the split axis narrowed to the lane's group."""
    parser = OverridesParser.create()
    if split.axis is None:
        return [*grid.fixed, *(f"{a.key}={','.join(a.values)}" for a in grid.axes)]
    out = list(grid.fixed)
    for axis in grid.axes:
        values = split.groups[lane] if axis.key == split.axis.key else axis.values
        out.append(f"{axis.key}={','.join(values)}")
    parser.parse_overrides(out)  # fails here, not in the lane, if a value does not survive the round trip
    return out


@dataclass
class Lane:
    """One lane process: its command, environment additions and log file; times and exit status once run."""

    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    started: float = float("nan")
    ended: float = float("nan")
    returncode: int | None = None


def run_lanes(lanes: Sequence[Lane], poll_s: float = 0.2) -> list[Lane]:
    """Start every lane at once (stdout + stderr to its log file), wait for all, record start / end / exit status.
    An interrupt (Ctrl-C) terminates the lanes still running before it propagates."""
    processes = []
    try:
        for lane in lanes:
            lane.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(lane.log_path, "w")  # noqa: SIM115 -- closed when the process ends
            lane.started = time.time()
            process = subprocess.Popen(
                lane.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **lane.env}
            )
            processes.append((lane, process, log))
        running = list(processes)
        while running:
            for item in list(running):
                lane, process, log = item
                if process.poll() is not None:
                    lane.ended, lane.returncode = time.time(), process.returncode
                    log.close()
                    running.remove(item)
            if running:
                time.sleep(poll_s)
    except BaseException:
        for _lane, process, log in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
            log.close()
        raise
    return list(lanes)


__all__ = ["Axis", "Grid", "Lane", "Split", "lane_overrides", "run_lanes", "split_grid", "sweep_grid"]
