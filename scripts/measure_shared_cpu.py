#!/usr/bin/env python
"""Step time of training runs side by side on a shared CPU vs alone, per thread setting.

For each setting: one training process alone, then two identical ones started together; each reports the median
time of its training steps (warm-up steps excluded), and the table gives the ratio "side by side / alone" per run.
On 2 cores, two runs side by side ideally take 2x their solo step time each (they split the cores); the aim is no
worse than ~2.2x. Settings (``--settings``, comma separated):

    spin        OMP_WAIT_POLICY unset (libgomp's default: spin-wait, then sleep), torch's default threads (before)
    passive     OMP_WAIT_POLICY=PASSIVE (the default now, proscale/utils/threads.py), torch's default threads
    passive-1   OMP_WAIT_POLICY=PASSIVE, num_threads=1
    spin-1      OMP_WAIT_POLICY unset, num_threads=1
    short-spin  OMP_WAIT_POLICY unset, GOMP_SPINCOUNT=10000 (libgomp spins ~30x shorter before it sleeps)

    python scripts/measure_shared_cpu.py                 # the measurement: main-job model, 30 steps (~10 min)
    python scripts/measure_shared_cpu.py --quick         # a check that it works: tiny model, 6 steps (~2 min)

Run it on an otherwise idle machine: other load changes both columns. Writes a markdown table (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback

from proscale.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "spin": ({"OMP_WAIT_POLICY": "default"}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "passive-1": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["num_threads=1"]),
    "spin-1": ({"OMP_WAIT_POLICY": "default"}, ["num_threads=1"]),
    "short-spin": ({"OMP_WAIT_POLICY": "default", "GOMP_SPINCOUNT": "10000"}, []),
}
FULL = ["experiment=cpu_synthetic", "pretrain=none", "data.num_train=480"]  # the main job's model and images
QUICK = ["experiment=tiny"]
WARMUP_STEPS = 2


class StepTimer(Callback):
    """Loaded by the training processes (``+callbacks.step_timer``): writes every training step's duration (s)
    to ``path`` as JSON when training ends."""

    def __init__(self, path: str) -> None:
        self.path, self.durations, self._start = Path(path), [], 0.0

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.durations.append(time.perf_counter() - self._start)

    def on_train_end(self, *args, **kwargs) -> None:
        self.path.write_text(json.dumps(self.durations))


def _command(preset: list[str], steps: int, work: Path, name: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        *preset,
        f"steps={steps}",
        "test=false",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "callbacks.compute_stats.timing_runs=0",
        "extras.print_config=false",
        "logger=csv",
        f"paths.log_dir={work / 'logs'}",
        f"paths.data_dir={work / 'data'}",
        f"hydra.run.dir={work / 'runs' / name}",
        "+callbacks.step_timer._target_=measure_shared_cpu.StepTimer",
        f"+callbacks.step_timer.path={work / (name + '.json')}",
        *extra,
    ]


def _run_together(commands: list[list[str]], env: dict[str, str], work: Path) -> None:
    processes = []
    for k, command in enumerate(commands):
        log = open(work / f"process_{k}.log", "w")
        processes.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in processes:
        process.wait()
        log.close()
        if process.returncode != 0:
            raise SystemExit(f"a training process failed (exit {process.returncode}); see {log.name}")


def _median_step(path: Path) -> float:
    durations = json.loads(path.read_text())[WARMUP_STEPS:]
    if not durations:
        raise SystemExit(f"{path}: no step after the {WARMUP_STEPS} warm-up steps; use more --steps")
    return statistics.median(durations)


def measure(setting: str, preset: list[str], steps: int, work: Path) -> dict[str, float]:
    env_update, extra = SETTINGS[setting]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'scripts'}{os.pathsep}{REPO}", "WANDB_MODE": "offline", **env_update}
    env.pop("OMP_NUM_THREADS", None)  # the setting decides
    _run_together([_command(preset, steps, work, f"{setting}_solo", extra)], env, work)
    pair = [_command(preset, steps, work, f"{setting}_pair{k}", extra) for k in range(2)]
    _run_together(pair, env, work)
    solo = _median_step(work / f"{setting}_solo.json")
    together = [_median_step(work / f"{setting}_pair{k}.json") for k in range(2)]
    return {"solo_s": solo, "pair_s": together, "ratio": [t / solo for t in together]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: checks that the script works")
    parser.add_argument("--steps", type=int, help="training steps per run (default 30, --quick 6)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma separated, of {list(SETTINGS)}")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; valid: {list(SETTINGS)}")
    preset, steps = (QUICK, args.steps or 6) if args.quick else (FULL, args.steps or 30)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="measure_shared_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; {' '.join(preset)}, {steps} steps per run; scratch: {work}", flush=True)
    # generate the data once, before any timing (two runs must not both generate it)
    _run_together(
        [_command(preset, 1, work, "warmup", [])],
        {**os.environ, "PYTHONPATH": f"{REPO / 'scripts'}{os.pathsep}{REPO}"},
        work,
    )
    rows = ["| setting | alone (s/step) | side by side (s/step, each) | ratio (each) |", "|---|---|---|---|"]
    results = {}
    for setting in settings:
        result = measure(setting, preset, steps, work)
        results[setting] = result
        pair = ", ".join(f"{t:.3f}" for t in result["pair_s"])
        ratio = ", ".join(f"{r:.2f}x" for r in result["ratio"])
        rows.append(f"| {setting} | {result['solo_s']:.3f} | {pair} | {ratio} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(f"\n{table}\n(command: {' '.join(['python', 'scripts/measure_shared_cpu.py', *(argv or sys.argv[1:])])})")
    if args.out:
        atomic_write_text(args.out, table + "\n")
    atomic_write_text(work / "results.json", json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
