"""Score COCO-format prediction files offline.

    python scripts/score_coco.py --task panoptic --gt-json F --gt-dir D --pred-json F --pred-dir D [--out M.json]
    python scripts/score_coco.py --task instance --gt-json F --pred-json F [--gt-dir D] [--out M.json]

Panoptic: panopticapi formats (PNG ids RGB-encoded). Instance: COCO results with RLE masks against a COCO
instance GT JSON, or against the thing segments of a panoptic GT JSON when ``--gt-dir`` holds its PNGs.
Prints a table, writes the metrics (0-100 scale) as JSON with ``--out`` and the per-class rows with
``--per-class-out`` (NaN, e.g. APs without small objects, is written as null). Bad inputs exit with status 2 and a message naming the file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from proscale.metrics.coco_files import evaluate_instance_files, evaluate_panoptic_files, scoring_workers
from proscale.utils.io import atomic_write_json


def _fmt(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}"


def print_table(task: str, metrics: dict[str, float], console: Console) -> None:
    if task == "panoptic":
        table = Table(title="Panoptic quality (0-100)")
        for col in ("", "PQ", "SQ", "RQ", "#classes"):
            table.add_column(col, justify="right")
        for label, suffix, n in (
            ("All", "", "num_classes_all"),
            ("Things", "_th", "num_classes_th"),
            ("Stuff", "_st", "num_classes_st"),
        ):
            table.add_row(label, *(_fmt(metrics[m + suffix]) for m in ("PQ", "SQ", "RQ")), str(int(metrics[n])))
    else:
        table = Table(title="Mask AP (0-100)")
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_row(*(_fmt(metrics[k]) for k in keys))
    console.print(table)


def print_per_class(rows: list[dict], console: Console) -> None:
    keys = [k for k in ("PQ", "SQ", "RQ", "TP", "FP", "FN", "AP") if rows and k in rows[0]]
    table = Table(title="Per class")
    for col in ("category_id", "name", *keys):
        table.add_column(col, justify="right")
    for row in rows:
        values = [_fmt(row[k]) if isinstance(row[k], float) else str(row[k]) for k in keys]
        table.add_row(str(row["category_id"]), str(row["name"]), *values)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("panoptic", "instance"), required=True)
    parser.add_argument("--gt-json", required=True, type=Path)
    parser.add_argument("--gt-dir", type=Path, help="GT PNG folder (panoptic GT)")
    parser.add_argument("--pred-json", required=True, type=Path)
    parser.add_argument("--pred-dir", type=Path, help="prediction PNG folder (panoptic)")
    parser.add_argument("--out", type=Path, help="write the metrics here as JSON")
    parser.add_argument("--per-class-out", type=Path, help="write the per-class rows here as JSON")
    parser.add_argument("--show-per-class", action="store_true", help="also print the per-class table")
    parser.add_argument("--workers", type=int, default=scoring_workers(), help="processes reading PNGs")
    args = parser.parse_args(argv)
    console = Console()
    try:
        if args.task == "panoptic":
            if args.gt_dir is None or args.pred_dir is None:
                parser.error("--task panoptic needs --gt-dir and --pred-dir")
            metrics, per_class = evaluate_panoptic_files(
                args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers
            )
        else:
            metrics, per_class = evaluate_instance_files(args.gt_json, args.pred_json, gt_dir=args.gt_dir)
    except ValueError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False, markup=True)
        return 2
    print_table(args.task, metrics, console)
    if args.show_per_class:
        print_per_class(per_class, console)
    if args.out:
        clean = {k: None if math.isnan(v) else int(v) if k.startswith("num_classes") else v for k, v in metrics.items()}
        atomic_write_json(args.out, clean)
        console.print(f"metrics written to {args.out}")
    if args.per_class_out:
        atomic_write_json(args.per_class_out, per_class)
    return 0


if __name__ == "__main__":
    sys.exit(main())
