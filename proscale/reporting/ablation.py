"""Collect the jobs of a Hydra multirun directory into the paper-style ablation table.

Every job directory of a sweep holds ``.hydra/{config,hydra,overrides}.yaml`` and, when the job got
far enough, ``results.json`` (written atomically by the training task; ``status`` is ``ok`` or
``failed``). A job without ``results.json`` crashed before it could write one: it is reported as a
failure, never silently dropped. Jobs that differ only by seed are grouped into one row with the
mean and standard deviation of each metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proscale.utils.io import atomic_write_text

METRICS = ("PQ", "AP", "mIoU")
COST_KEYS = ("encoder_gflops", "total_gflops", "params_m", "ms_per_img")


@dataclass
class Job:
    """One multirun job: its identifying settings, status, metrics and costs."""

    path: Path
    backbone: str
    encoder: str
    schedule: str
    lpe: bool
    seed: int | None
    status: str
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = "M2F" if self.encoder == "m2f" else self.encoder
        if self.encoder == "proscale":
            name = f"PRO-SCALE {self.schedule}"
        return f"{name}{' + LPE' if self.lpe else ''}"

    @property
    def group_key(self) -> tuple[str, str, str, bool]:
        return (self.backbone, self.encoder, self.schedule, self.lpe)


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def _dig(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def find_job_dirs(multirun_dir: Path) -> list[Path]:
    """Job directories = folders holding a ``.hydra`` folder (Hydra writes it before the job runs)."""
    multirun_dir = Path(multirun_dir)
    if not multirun_dir.is_dir():
        raise ValueError(f"multirun directory {multirun_dir} does not exist")
    jobs = sorted({p.parent.parent for p in multirun_dir.rglob(".hydra/config.yaml")}, key=_job_sort_key)
    if not jobs:
        raise ValueError(f"no Hydra job directories (with .hydra/config.yaml) under {multirun_dir}")
    return jobs


def _job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def load_job(job_dir: Path) -> Job:
    cfg = _read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    choices = _dig(_read_yaml(job_dir / ".hydra" / "hydra.yaml") or {}, "hydra.runtime.choices", {}) or {}
    encoder = str(choices.get("model/encoder") or _dig(cfg, "model.encoder._target_", "?").rsplit(".", 1)[-1])
    backbone = str(choices.get("model/backbone") or _dig(cfg, "model.backbone.name", "?"))
    if backbone == "timm":  # the generic timm group: name the actual model
        backbone = str(_dig(cfg, "model.backbone.model_name", None) or backbone)
    schedule = _dig(cfg, "model.encoder.schedule")
    schedule_str = "(" + ",".join(str(int(p)) for p in schedule) + ")" if schedule else "-"
    job = Job(
        path=job_dir,
        backbone=backbone,
        encoder=encoder,
        schedule=schedule_str,
        lpe=bool(_dig(cfg, "model.lpe", False)),
        seed=_dig(cfg, "seed"),
        status="failed",
    )
    results_path = job_dir / "results.json"
    if not results_path.exists():
        job.error = "no results.json: the job died before writing one (see its log)"
        return job
    try:
        results = json.loads(results_path.read_text())
    except json.JSONDecodeError as err:
        job.error = f"unreadable {results_path}: {err}"
        return job
    job.status = str(results.get("status", "ok"))
    job.error = str(results.get("error", "") or "")
    tags = results.get("tags") or {}
    job.encoder = str(tags.get("encoder") or job.encoder)
    job.backbone = str(tags.get("backbone") or job.backbone)
    job.lpe = bool(tags.get("lpe", job.lpe))
    job.seed = tags.get("seed", job.seed)
    # headline metrics are top-level keys of results.json (proscale.utils.results)
    job.metrics = {k: float(results[k]) for k in METRICS if _is_number(results.get(k))}
    for key in COST_KEYS:
        value = results.get(key)
        if key == "params_m" and value is None and _is_number(results.get("params")):
            value = float(results["params"]) / 1e6
        if _is_number(value):
            job.costs[key] = float(value)
    return job


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per (backbone, encoder, schedule, LPE): mean/std over successful seeds, failures counted."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group_key, []).append(job)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1] != "m2f", k[1], k[2], k[3])):
        members = groups[key]
        ok = [j for j in members if j.status == "ok"]
        row: dict[str, Any] = {
            "backbone": key[0],
            "model": members[0].label,
            "encoder": key[1],
            "schedule": key[2],
            "lpe": key[3],
            "runs_ok": len(ok),
            "runs_failed": len(members) - len(ok),
            "errors": "; ".join(f"{j.path.name}: {j.error}" for j in members if j.status != "ok"),
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                [j.metrics[metric] for j in ok if metric in j.metrics]
            )
        for cost in COST_KEYS:
            values = [j.costs[cost] for j in ok if cost in j.costs] or [
                j.costs[cost] for j in members if cost in j.costs
            ]
            row[cost] = statistics.fmean(values) if values else math.nan
        rows.append(row)
    return rows


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def to_markdown(rows: list[dict[str, Any]], title: str) -> str:
    header = "| backbone | model | PQ | AP | mIoU | enc. GFLOPs | total GFLOPs | params (M) | ms/img | runs |"
    lines = [f"# {title}", "", header, "|" + "---|" * 10]
    for r in rows:
        metric_cells = [
            f"{_fmt(r[f'{m}_mean'])} ± {_fmt(r[f'{m}_std'])}" if r["runs_ok"] else "failed" for m in METRICS
        ]
        runs = f"{r['runs_ok']} ok" + (f", {r['runs_failed']} failed" if r["runs_failed"] else "")
        lines.append(
            f"| {r['backbone']} | {r['model']} | "
            + " | ".join(metric_cells)
            + f" | {_fmt(r['encoder_gflops'])} | {_fmt(r['total_gflops'])} | {_fmt(r['params_m'])}"
            + f" | {_fmt(r['ms_per_img'], 1)} | {runs} |"
        )
    failures = [r for r in rows if r["runs_failed"]]
    if failures:
        lines += ["", "## Failed jobs", ""] + [f"- {r['model']} ({r['backbone']}): {r['errors']}" for r in failures]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def plot_pq_vs_gflops(rows: list[dict[str, Any]], path: Path) -> None:
    """PQ (mean ± std over seeds) against total GFLOPs, one marker per row, LPE rows hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in rows:
        if not r["runs_ok"] or math.isnan(r["PQ_mean"]) or math.isnan(r["total_gflops"]):
            continue
        ax.errorbar(
            r["total_gflops"],
            r["PQ_mean"],
            yerr=r["PQ_std"],
            fmt="o" if not r["lpe"] else "s",
            mfc="white" if r["lpe"] else None,
            capsize=3,
            label=f"{r['model']} ({r['backbone']})",
        )
    ax.set_xlabel("total GFLOPs (one multiply-add = 1 flop)")
    ax.set_ylabel("PQ")
    ax.set_title("PQ vs. compute")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_tables(multirun_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write ablation.md / ablation.csv / pq_vs_gflops.png into ``out_dir`` (default: the multirun dir)."""
    multirun_dir = Path(multirun_dir)
    out_dir = Path(out_dir) if out_dir else multirun_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [load_job(d) for d in find_job_dirs(multirun_dir)]
    rows = summarize(jobs)
    paths = {"markdown": out_dir / "ablation.md", "csv": out_dir / "ablation.csv", "plot": out_dir / "pq_vs_gflops.png"}
    atomic_write_text(paths["markdown"], to_markdown(rows, f"Ablation: {multirun_dir}"))
    atomic_write_text(paths["csv"], to_csv(rows))
    plot_pq_vs_gflops(rows, paths["plot"])
    return paths
