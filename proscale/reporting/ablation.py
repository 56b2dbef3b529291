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

from proscale.reporting.stats import mean_std, welch_difference
from proscale.utils.io import atomic_save_figure, atomic_write_text

METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
COST_KEYS = ("encoder_gflops", "total_gflops", "params_m", "ms_per_img")
PAPER_SIZE = (800, 1088)  # the paper's GFLOP protocol (COCO, short side 800, padded)
CONFIDENCE = 0.95


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
    image_size: tuple[int, int] | None = None  # the size the run's GFLOPs and ms/img were measured at
    model_config: dict[str, Any] | None = None
    smoke_run: bool = False  # the job's config says its numbers mean nothing (`ablation.smoke_run`)

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
    encoder = str(
        choices.get("model/encoder")
        or _dig(cfg, "model.encoder.name", None)
        or _dig(cfg, "model.encoder._target_", "?").rsplit(".", 1)[-1]
    )
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
        image_size=_size(_dig(cfg, "callbacks.compute_stats.image_size")),
        model_config=_dig(cfg, "model"),
        smoke_run=bool(_dig(cfg, "ablation.smoke_run", False)),
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


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def paper_size_gflops(model_config: dict[str, Any] | None, size: tuple[int, int] = PAPER_SIZE) -> dict[str, float]:
    """Encoder / total GFLOPs of a job's model at the paper's size, counted on the meta device (no weights, a
    second or two); empty when the job's config cannot be rebuilt."""
    if not model_config or "_target_" not in model_config:
        return {}
    import copy

    import torch
    from hydra.utils import instantiate

    from proscale.analysis.flops import count_flops

    cfg = copy.deepcopy(model_config)
    if not isinstance(cfg.get("num_classes"), int):
        cfg["num_classes"] = 133  # class-head FLOPs only; the table's comparison does not depend on it
    if isinstance(cfg.get("backbone"), dict):
        cfg["backbone"]["pretrained"] = None  # shapes only: never read a weight file here
    try:
        with torch.device("meta"):
            model = instantiate(cfg)
        flops = count_flops(model, image_size=size)
    except Exception:  # an old or foreign config: the column stays empty rather than failing the table
        return {}
    return {"encoder_gflops": flops["encoder"], "total_gflops": flops["total"]}


def summarize(jobs: list[Job], paper_size: bool = True) -> list[dict[str, Any]]:
    """One row per (backbone, encoder, schedule, LPE): mean/std over successful seeds, failures counted, the PQ
    difference to M2F (same backbone, LPE off) with a Welch 95 % interval, and (``paper_size``) the GFLOPs at the
    paper's 800x1088."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group_key, []).append(job)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1] != "m2f", k[1], k[2], k[3])):
        members = groups[key]
        ok = [j for j in members if j.status == "ok"]
        sizes = {j.image_size for j in members if j.image_size}
        row: dict[str, Any] = {
            "backbone": key[0],
            "model": members[0].label,
            "encoder": key[1],
            "schedule": key[2],
            "lpe": key[3],
            "runs_ok": len(ok),
            "runs_failed": len(members) - len(ok),
            "errors": "; ".join(f"{j.path.name}: {j.error}" for j in members if j.status != "ok"),
            "run_size": "x".join(map(str, sizes.pop())) if len(sizes) == 1 else "",
        }
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(
                [j.metrics[metric] for j in ok if metric in j.metrics]
            )
        row["_PQ_values"] = [j.metrics["PQ"] for j in ok if "PQ" in j.metrics]
        for cost in COST_KEYS:
            values = [j.costs[cost] for j in ok if cost in j.costs] or [
                j.costs[cost] for j in members if cost in j.costs
            ]
            row[cost] = statistics.fmean(values) if values else math.nan
        paper = paper_size_gflops(members[0].model_config) if paper_size else {}
        row["paper_encoder_gflops"] = paper.get("encoder_gflops", math.nan)
        row["paper_total_gflops"] = paper.get("total_gflops", math.nan)
        rows.append(row)
    for row in rows:
        reference = next(
            (r for r in rows if r["backbone"] == row["backbone"] and r["encoder"] == "m2f" and not r["lpe"]), None
        )
        diff = welch_difference(row["_PQ_values"], reference["_PQ_values"], CONFIDENCE) if reference else None
        row["dPQ"] = diff.value if diff else math.nan
        row["dPQ_low"] = diff.low if diff else math.nan
        row["dPQ_high"] = diff.high if diff else math.nan
    for row in rows:
        del row["_PQ_values"]
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _gflops(value: float) -> str:
    """Three significant figures: GFLOPs span 0.01 (CPU presets) to 100s (the paper's size)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _metric_cell(row: dict[str, Any], metric: str) -> str:
    if not row["runs_ok"]:
        return "failed"
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"


def _difference_cell(row: dict[str, Any]) -> str:
    if row["encoder"] == "m2f" and not row["lpe"]:
        return "(reference)"
    if math.isnan(row["dPQ"]):
        return "-"
    if math.isnan(row["dPQ_low"]):
        return f"{row['dPQ']:+.2f} (no interval: < 2 runs)"
    return f"{row['dPQ']:+.2f} [{row['dPQ_low']:+.2f}, {row['dPQ_high']:+.2f}]"


def attach_timing(rows: list[dict[str, Any]], timing: dict[str, Any] | None) -> None:
    """Copy the round-robin medians of ``timing`` (:mod:`proscale.reporting.inference_timing`) into the rows as
    ``timed_ms`` ({size label: ms}); rows without a timed configuration get an empty dict."""
    medians = {tuple(c["key"]): c["median_ms"] for c in (timing or {}).get("configs", [])}
    for row in rows:
        row["timed_ms"] = dict(medians.get((row["backbone"], row["encoder"], row["schedule"], row["lpe"]), {}))


def _timed(row: dict[str, Any], label: str) -> float:
    return float(row.get("timed_ms", {}).get(label, math.nan))


def inversion_notes(rows: list[dict[str, Any]], run_label: str, paper_label: str) -> list[str]:
    """One sentence per PRO-SCALE row that is slower than M2F (same backbone and LPE) at the run size but faster at
    the paper's size: the saving in encoder work only shows once there are enough tokens."""
    notes = []
    for row in rows:
        if row["encoder"] == "m2f":
            continue
        reference = next(
            (
                r
                for r in rows
                if r["encoder"] == "m2f" and r["backbone"] == row["backbone"] and r["lpe"] == row["lpe"]
            ),
            None,
        )
        if reference is None:
            continue
        mine_run, ref_run = _timed(row, run_label), _timed(reference, run_label)
        mine_paper, ref_paper = _timed(row, paper_label), _timed(reference, paper_label)
        if any(math.isnan(v) for v in (mine_run, ref_run, mine_paper, ref_paper)):
            continue
        if mine_run > ref_run and mine_paper < ref_paper:
            notes.append(
                f"{row['model']} ({row['backbone']}) is slower than {reference['model']} at {run_label} "
                f"({mine_run:.1f} vs {ref_run:.1f} ms) but faster at {paper_label} ({mine_paper:.1f} vs "
                f"{ref_paper:.1f} ms): at {run_label} the encoder has few tokens, so the fixed cost of each call "
                "(kernel launches, Python, the extra LPE / per-scale modules) outweighs the FLOPs it saves; the saving "
                f"shows at {paper_label}."
            )
    return notes


def _timing_note(timing: dict[str, Any]) -> str:
    load = timing.get("load_average_before")
    load_text = ", ".join(f"{v:.2f}" for v in load) if load else "unknown"
    after = timing.get("load_average_after")
    after_text = ", ".join(f"{v:.2f}" for v in after) if after else "unknown"
    return (
        f"ms/img: measured after training, all configurations in one process, round-robin (warm-up {timing['warmup']}, "
        f"{timing['repeats']} rounds, the starting configuration rotating), median per image; batch 1, model forward + "
        f"inference at the input size, {timing['threads']} torch thread(s) on a {timing.get('cpu_cores', '?')}-core "
        f"machine, {timing.get('date_utc', '')}. One model per row (the first finished seed's best checkpoint). The "
        "sweep's training lanes had ended; other processes were not controlled: load average (1, 5, 15 min) before "
        f"timing {load_text}, after {after_text} (a load above the thread count means the timings shared the cores)."
    )


def to_markdown(
    rows: list[dict[str, Any]], title: str, timing: dict[str, Any] | None = None, smoke_run: bool = False
) -> str:
    """The table as markdown. ``timing`` (``inference_timing.json``) replaces the per-job ms/img column by the
    round-robin medians at the run size and at the paper's size; ``smoke_run`` marks the whole table as one."""
    run_sizes = {r["run_size"] for r in rows}
    run_size = run_sizes.pop() if len(run_sizes) == 1 and "" not in run_sizes else None
    at_run = f"@ {run_size}" if run_size else "@ run size"
    paper = "x".join(map(str, PAPER_SIZE))
    timed = bool(timing and timing.get("configs"))
    timed_sizes: list[str] = []
    if timed:
        attach_timing(rows, timing)
        timed_sizes = list(timing.get("sizes") or [run_size or "", paper])
        if run_size in timed_sizes:  # the run size first, then the larger (paper) size
            timed_sizes.remove(run_size)
            timed_sizes.insert(0, run_size)
    columns = ["backbone", "model", *METRICS, "ΔPQ vs M2F [95 % CI]", f"enc. GFLOPs {at_run}"]
    columns += [f"total GFLOPs {at_run}", f"enc. GFLOPs @ {paper}", f"total GFLOPs @ {paper}", "params (M)"]
    columns += [f"ms/img @ {size}" for size in timed_sizes] if timed else [f"ms/img {at_run} (per job)"]
    columns += ["runs"]
    heading = f"# SMOKE RUN (numbers mean nothing) -- {title}" if smoke_run else f"# {title}"
    lines = [heading, ""]
    if smoke_run:
        lines += [
            "**SMOKE RUN**: a few training steps on a tiny dataset, to check that the pipeline runs end to end. "
            "Its PQ, differences and timings say nothing about the encoders.",
            "",
        ]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        runs = f"{r['runs_ok']} ok" + (f", {r['runs_failed']} failed" if r["runs_failed"] else "")
        model = r["model"] + (f" ({r['run_size']})" if not run_size and r["run_size"] else "")
        cells = [r["backbone"], model, *(_metric_cell(r, m) for m in METRICS), _difference_cell(r)]
        cells += [_gflops(r["encoder_gflops"]), _gflops(r["total_gflops"])]
        cells += [_gflops(r["paper_encoder_gflops"]), _gflops(r["paper_total_gflops"]), _fmt(r["params_m"])]
        if timed:
            cells += [_fmt(_timed(r, size), 1) for size in timed_sizes]
        else:
            cells += [_fmt(r["ms_per_img"], 1)]
        cells += [runs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Metrics on the 0-100 scale: mean ± sample std over the seeds that finished (a single run shows its value "
        "alone). ΔPQ: difference of mean PQ to M2F (same backbone, LPE off) with Welch's 95 % t interval. GFLOPs "
        "per image, one multiply-add = one FLOP (fvcore convention), inference post-processing included; params "
        "in millions.",
        "",
        _timing_note(timing)
        if timed
        else "ms/img measured by each job on its own (median of a few passes after a warm-up), while the sweep's "
        "other jobs may have been running: not comparable across rows.",
    ]
    if timed and run_size and len(timed_sizes) > 1 and timed_sizes[0] == run_size:
        notes = inversion_notes(rows, run_size, timed_sizes[1])
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    failures = [r for r in rows if r["runs_failed"]]
    if failures:
        lines += ["", "## Failed jobs", ""] + [f"- {r['model']} ({r['backbone']}): {r['errors']}" for r in failures]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    rows = [_flat_timing(r) for r in rows]
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _flat_timing(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k != "timed_ms"}
    for label, value in (row.get("timed_ms") or {}).items():
        flat[f"timed_ms_{label}"] = value
    return flat


SCHEDULE_MARKERS = {"-": "o", "(1,1,1)": "s", "(2,2,2)": "^", "(3,3,3)": "D"}
LPE_STYLE = {False: ("C0", "LPE off"), True: ("C3", "LPE on")}


def _plotted_x(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The x column and its label: encoder GFLOPs at the paper's size when every plotted row has it, else at the
    run size."""
    if rows and all(not math.isnan(r["paper_encoder_gflops"]) for r in rows):
        return "paper_encoder_gflops", "encoder GFLOPs per image @ " + "x".join(map(str, PAPER_SIZE))
    sizes = {r["run_size"] for r in rows}
    size = sizes.pop() if len(sizes) == 1 and "" not in sizes else "run size"
    return "encoder_gflops", f"encoder GFLOPs per image @ {size}"


def plot_pq_vs_gflops(rows: list[dict[str, Any]], path: Path, smoke_run: bool = False) -> list[dict[str, Any]]:
    """PQ (mean, error bar ± 1 std over seeds) against encoder GFLOPs: one marker per schedule, LPE off / on as
    two colours, one panel per backbone. Without a finished run the figure says so instead of empty axes.

    Returns what each panel shows (``backbone``, ``points``, ``ylim``, ``xlabel``, ``message``, and ``series``: per
    point its schedule, LPE, colour, marker, x, y and error bar), for tests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    plotted = [r for r in rows if r["runs_ok"] and not math.isnan(r["PQ_mean"])]
    x_key, x_label = _plotted_x(plotted)
    plotted = [r for r in plotted if not math.isnan(r[x_key])]
    backbones = sorted({r["backbone"] for r in plotted}) or ["-"]
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.6 * len(backbones), 4.4), dpi=120, squeeze=False)
    panels = []
    for ax, backbone in zip(axes[0], backbones):
        mine = [r for r in plotted if r["backbone"] == backbone]
        if not mine:
            failed = sum(r["runs_failed"] for r in rows)
            message = f"nothing to plot: no finished run with PQ ({failed} failed)"
            panels.append({"backbone": backbone, "points": 0, "ylim": None, "xlabel": None, "message": message})
            ax.text(
                0.5,
                0.5,
                message,
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_axis_off()
            continue
        series = []
        for r in mine:
            colour, _ = LPE_STYLE[bool(r["lpe"])]
            series.append({"schedule": r["schedule"], "lpe": bool(r["lpe"]), "colour": colour,
                           "marker": SCHEDULE_MARKERS.get(r["schedule"], "P"), "x": r[x_key], "y": r["PQ_mean"],
                           "yerr": None if math.isnan(r["PQ_std"]) else r["PQ_std"]})
            std = r["PQ_std"]
            ax.errorbar(
                r[x_key],
                r["PQ_mean"],
                yerr=None if math.isnan(std) else std,
                capsize=3,
                color=colour,
                marker=SCHEDULE_MARKERS.get(r["schedule"], "P"),
                markersize=7,
                linestyle="none",
            )
        top = max(r["PQ_mean"] + (0 if math.isnan(r["PQ_std"]) else r["PQ_std"]) for r in mine)
        ax.set_ylim(0, max(1.0, top * 1.1))
        ax.set_xlim(left=0, right=max(r[x_key] for r in mine) * 1.15 or 1.0)
        ax.set_xlabel(x_label + " (1 multiply-add = 1 FLOP)")
        ax.set_ylabel("PQ (%)")
        seeds = sorted({r["runs_ok"] for r in mine})
        ax.set_title(f"{backbone}: PQ vs. encoder compute ({'/'.join(map(str, seeds))} seed(s) per point)", fontsize=9)
        ax.grid(alpha=0.3)
        schedules = sorted({r["schedule"] for r in mine}, key=lambda s: (s != "-", s))
        handles = [
            Line2D(
                [],
                [],
                color="0.3",
                marker=SCHEDULE_MARKERS.get(s, "P"),
                linestyle="none",
                label="M2F" if s == "-" else f"PRO-SCALE {s}",
            )
            for s in schedules
        ]
        handles += [
            Line2D([], [], color=c, marker="o", linestyle="none", label=name)
            for lpe, (c, name) in LPE_STYLE.items()
            if any(bool(r["lpe"]) == lpe for r in mine)
        ]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
        panels.append(
            {
                "backbone": backbone,
                "points": len(mine),
                "ylim": ax.get_ylim(),
                "xlabel": ax.get_xlabel(),
                "message": None,
                "series": series,
            }
        )
    if smoke_run:
        fig.suptitle("SMOKE RUN: these numbers mean nothing", color="C3", fontsize=11, fontweight="bold")
    fig.tight_layout()
    atomic_save_figure(path, fig)
    plt.close(fig)
    return panels


def write_tables(multirun_dir: Path, out_dir: Path | None = None, paper_size: bool = True) -> dict[str, Path]:
    """Write ablation.md / ablation.csv / pq_vs_gflops.png into ``out_dir`` (default: the multirun dir), with the
    round-robin timings of ``inference_timing.json`` when the sweep folder has one."""
    from proscale.reporting.inference_timing import read_timing

    multirun_dir = Path(multirun_dir)
    out_dir = Path(out_dir) if out_dir else multirun_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [load_job(d) for d in find_job_dirs(multirun_dir)]
    rows = summarize(jobs, paper_size=paper_size)
    smoke = any(j.smoke_run for j in jobs)
    timing = read_timing(multirun_dir)
    paths = {"markdown": out_dir / "ablation.md", "csv": out_dir / "ablation.csv", "plot": out_dir / "pq_vs_gflops.png"}
    text = to_markdown(rows, f"Ablation: {multirun_dir}", timing=timing, smoke_run=smoke)
    atomic_write_text(paths["markdown"], text)
    atomic_write_text(paths["csv"], to_csv(rows))
    plot_pq_vs_gflops(rows, paths["plot"], smoke_run=smoke)
    return paths
