"""Inference time of a sweep's configurations, measured after training, round-robin, in one process.

Per-job timings taken during a sweep are not comparable: each job times itself while other jobs (the other lane)
or other users compete for the cores, at a different moment for each configuration. Here one model per configuration
(backbone, encoder, schedule, LPE) is loaded, from the first finished job's best checkpoint (random weights from the
job's config when there is none: weights do not change the time, except through how many segments the
post-processing keeps), and all of them are timed in turns: a warm-up of every model, then ``repeats`` rounds in
which every model runs once (the starting model rotates each round), so a slow phase of the machine hits every
configuration alike. Reported per size: the median ms per image (batch 1, eval mode, no autograd, model forward +
panoptic/instance/semantic inference at the input size), with the thread count and the load average before and
after, written to ``inference_timing.json`` beside the sweep's jobs.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TIMING_FILENAME = "inference_timing.json"


def size_label(size: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in size)


def round_robin_ms(
    calls: dict[str, Callable[[], object]], warmup: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Milliseconds of every call of ``calls``, timed in turns: ``warmup`` untimed rounds, then ``repeats`` timed
    rounds; round r starts with the (r mod n)-th call, so no configuration always runs first or last."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        start = round_index % len(names) if names else 0
        for name in names[start:] + names[:start]:
            t0 = clock()
            calls[name]()
            times[name].append((clock() - t0) * 1000.0)
    return times


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _job_model(job: Any) -> tuple[Any, Any, str]:
    """(model, inference, source) of a finished job: its best checkpoint, else its config with random weights."""
    import hydra
    import torch

    from proscale.models.inference import Mask2FormerInference
    from proscale.weights import read_weights

    results_path = Path(job.path) / "results.json"
    best = json.loads(results_path.read_text()).get("best_checkpoint") if results_path.is_file() else None
    if best and Path(best).is_file():
        loaded = read_weights(best)
        model = hydra.utils.instantiate(loaded.model_config)
        model.load_state_dict(loaded.state_dict)
        meta = loaded.meta or {}
        isthing = list(meta.get("isthing") or [])
        num_classes = len(isthing) or int(loaded.model_config["num_classes"])
        thing_classes = [i for i, t in enumerate(isthing) if t] or None
        inference = Mask2FormerInference(num_classes, thing_classes, **(loaded.inference or {}))
        return model.eval(), inference.eval(), str(best)
    import copy

    cfg = copy.deepcopy(job.model_config or {})
    if not isinstance(cfg.get("num_classes"), int):
        cfg["num_classes"] = 10
    if isinstance(cfg.get("backbone"), dict):
        cfg["backbone"]["pretrained"] = None
    with torch.device("cpu"):
        model = hydra.utils.instantiate(cfg)
    return model.eval(), Mask2FormerInference(cfg["num_classes"]).eval(), "random weights (no checkpoint)"


def _inference_call(model: Any, inference: Any, size: Sequence[int]) -> Callable[[], object]:
    """One image of ``size`` through ``model`` and ``inference`` (masks kept at the input size), no autograd."""
    import torch

    height, width = int(size[0]), int(size[1])
    images = torch.randn(1, 3, height, width)

    def run() -> object:
        with torch.no_grad():
            return inference(model(images), [(height, width)], [(height, width)])

    return run


def time_configurations(
    jobs: Sequence[Any], sizes: Sequence[Sequence[int]], warmup: int = 2, repeats: int = 10, threads: int = 1
) -> dict[str, Any]:
    """Round-robin inference time of one model per configuration of ``jobs``
    (:class:`proscale.reporting.ablation.Job`) at each of ``sizes`` ((H, W), multiples of 32).

    Returns the ``inference_timing.json`` payload: settings, load averages and, per configuration, its key
    (backbone, encoder, schedule, LPE), label, weight source and ``median_ms`` / ``runs_ms`` per size label."""
    import torch

    torch.set_num_threads(int(threads))
    chosen: dict[tuple, Any] = {}
    for job in sorted(jobs, key=lambda j: (j.status != "ok", j.seed if isinstance(j.seed, int) else 1 << 30)):
        chosen.setdefault(job.group_key, job)
    models = {key: _job_model(job) for key, job in chosen.items()}
    load_before = load_average()
    started = time.perf_counter()
    per_size: dict[str, dict[tuple, list[float]]] = {}
    for size in sizes:
        calls = {key: _inference_call(model, inference, size) for key, (model, inference, _) in models.items()}
        per_size[size_label(size)] = round_robin_ms(calls, warmup, repeats)
    configs = []
    for key, job in chosen.items():
        runs = {label: times[key] for label, times in per_size.items()}
        configs.append(
            {
                "key": list(key),
                "label": job.label,
                "source": models[key][2],
                "median_ms": {label: statistics.median(values) for label, values in runs.items()},
                "runs_ms": runs,
            }
        )
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": int(threads),
        "cpu_cores": os.cpu_count(),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "sizes": [size_label(s) for s in sizes],
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "timing_wall_s": time.perf_counter() - started,
        "configs": configs,
    }


def write_timing(sweep_dir: Path, payload: dict[str, Any]) -> Path:
    from proscale.utils.io import atomic_write_json

    return atomic_write_json(Path(sweep_dir) / TIMING_FILENAME, payload)


def read_timing(sweep_dir: Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / TIMING_FILENAME
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    for config in payload.get("configs", []):
        config["key"] = tuple(config["key"])
        config["median_ms"] = {k: (math.nan if v is None else float(v)) for k, v in config["median_ms"].items()}
    return payload


__all__ = ["TIMING_FILENAME", "read_timing", "round_robin_ms", "size_label", "time_configurations", "write_timing"]
