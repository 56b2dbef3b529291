"""Compute analysis from the command line: GFLOPs and parameters per part, and the paper's compute table.

One model (Hydra overrides of ``conf/train.yaml``, like ``scripts/train.py``)::

    python scripts/flops.py model/backbone=r50 model/encoder=proscale model.encoder.schedule=[1,1,1] model.lpe=true

The full compute table (``make flops-table``): M2F, RT-M2F, Lite-M2F, PRO-SCALE (1,1,1) (2,2,2) (3,3,3)
(3,1,1) (1,3,1) (1,1,3), each with LPE off/on, for R50 and Swin-T, 133 classes; writes ``flops_table.csv``,
``flops_table.md`` and ``compute_distribution.png`` under ``--out`` and prints the paper's four numbers::

    python scripts/flops.py --table [--out outputs/flops] [--backbones r50] [--models m2f proscale_111]

``--speed`` adds measured encoder / forward milliseconds (median after warm-up, CUDA if present, else CPU;
``--speed-size H W`` to time at another size: a full-size CPU forward takes seconds per model).

Sizes: ``--image-size H W`` (padded input, default 800 1088) and ``--orig-size H W`` (post-processing size,
default 480 640), or ``--average-sizes 480x640 427x640 ...`` for the mean over images of those original sizes
at COCO test-time resize. Models are built on the meta device: nothing is allocated, counting takes seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from proscale.analysis.flop_report import (
    csv_text,
    markdown_table,
    paper_numbers_markdown,
    paper_numbers_text,
)
from proscale.analysis.flop_table import (
    NUM_CLASSES,
    PAPER_BACKBONES,
    VARIANTS,
    SizeProtocol,
    build_model,
    compare_paper_numbers,
    table_rows,
    variants_by_key,
)
from proscale.analysis.flops import PART_KEYS, count_params
from proscale.utils.io import atomic_write_bytes, atomic_write_text

DEFAULT_OUT = Path("outputs/flops")


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like 480x640") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml (single-model mode)")
    parser.add_argument("--table", action="store_true", help="the full compute table (+ CSV, markdown, PNG)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=(800, 1088))
    parser.add_argument("--orig-size", type=int, nargs=2, metavar=("H", "W"), default=(480, 640))
    parser.add_argument("--average-sizes", type=parse_size, nargs="+", metavar="HxW", help="mean over these")
    parser.add_argument("--backbones", nargs="+", default=list(PAPER_BACKBONES), choices=list(PAPER_BACKBONES))
    parser.add_argument("--models", nargs="+", default=[v.key for v in VARIANTS], help="table rows (keys)")
    parser.add_argument("--lpe", nargs="+", default=["off", "on"], choices=["off", "on"], help="LPE settings")
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="classes in --table mode")
    parser.add_argument("--speed", action="store_true", help="add measured ms columns (random weights)")
    parser.add_argument("--speed-size", type=int, nargs=2, metavar=("H", "W"), help="timing size (default: input)")
    parser.add_argument("--speed-repeats", type=int, default=3, help="timed runs per model (median)")
    return parser


def size_protocol(args: argparse.Namespace) -> SizeProtocol:
    if args.average_sizes:
        return SizeProtocol(orig_sizes=tuple(args.average_sizes))
    return SizeProtocol(image_size=tuple(args.image_size), orig_size=tuple(args.orig_size))


def speed_columns(args: argparse.Namespace, sizes: SizeProtocol) -> Any:
    """``extra_columns`` callback: measured encoder / forward ms of a randomly initialised real model."""
    import torch

    from proscale.analysis.flop_speed import measured_ms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    image_size = tuple(args.speed_size or sizes.image_size or (800, 1088))
    print(f"--speed: timing on {device} at {image_size[0]}x{image_size[1]}, {args.speed_repeats} runs", file=sys.stderr)

    def measure(overrides: list[str]) -> dict[str, float]:
        return measured_ms(build_model(overrides, device="cpu"), image_size, device, repeats=args.speed_repeats)

    return measure


def run_table(args: argparse.Namespace) -> int:
    sizes = size_protocol(args)
    extra = speed_columns(args, sizes) if args.speed else None
    rows = table_rows(
        backbones=args.backbones,
        variants=variants_by_key(args.models),
        lpe_settings=[setting == "on" for setting in args.lpe],
        num_classes=args.num_classes,
        sizes=sizes,
        extra_columns=extra,
        progress=lambda text: print(f"counting {text}", file=sys.stderr),
    )
    table = markdown_table(rows)
    print(table)
    header = (
        f"# Compute table ({sizes.describe()}; {args.num_classes} classes; GFLOPs = 1e9 multiply-adds, fvcore "
        "conventions; reductions vs M2F with the same backbone and no LPE; PRO-SCALE with TRC)\n\n"
    )
    markdown = header + table
    try:
        comparison = compare_paper_numbers(rows)
    except ValueError as error:  # a restricted table may not contain the rows the paper's numbers need
        print(f"paper numbers not computed: {error}", file=sys.stderr)
        comparison = []
    if comparison:
        print(paper_numbers_text(comparison))
        markdown += "\n## The paper's numbers (released settings: TRC on, LPE on for PRO-SCALE)\n\n"
        markdown += paper_numbers_markdown(comparison)
    from proscale.analysis.plots import compute_distribution_png

    paths = [
        atomic_write_text(args.out / "flops_table.csv", csv_text(rows)),
        atomic_write_text(args.out / "flops_table.md", markdown),
        atomic_write_bytes(args.out / "compute_distribution.png", compute_distribution_png(rows, sizes.describe())),
    ]
    if comparison:
        paths.append(atomic_write_text(args.out / "paper_numbers.csv", csv_text(comparison)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_single(args: argparse.Namespace) -> int:
    sizes = size_protocol(args)
    model = build_model(args.overrides)
    flops = sizes.count(model)
    params = count_params(model)
    rows = [
        {
            "part": key,
            "gflops": flops[key],
            "pct_of_total": 100 * flops[key] / flops["total"],
            "params_m": params[key] / 1e6,
        }
        for key in PART_KEYS
    ]
    columns = (
        ("part", "part", "{}"),
        ("gflops", "GFLOPs", "{:.3f}"),
        ("pct_of_total", "% of total", "{:.2f}"),
        ("params_m", "params M", "{:.3f}"),
    )
    title = f"# {' '.join(args.overrides) or 'default model'} ({sizes.describe()})\n\n"
    table = markdown_table(rows, columns)
    print(title + table)
    paths = [
        atomic_write_text(args.out / "model_flops.csv", csv_text(rows)),
        atomic_write_text(args.out / "model_flops.md", title + table),
    ]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table and args.overrides:
        raise SystemExit("--table builds its own models; do not pass overrides with it")
    return run_table(args) if args.table else run_single(args)


if __name__ == "__main__":
    sys.exit(main())
