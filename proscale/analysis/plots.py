"""Figures of the compute analysis: the compute distribution of the paper's Fig. 1, for every model.

``compute_distribution_figure(rows)`` takes the rows of :func:`proscale.analysis.flop_table.table_rows`
and draws (a) one pie per backbone for plain M2F, split into backbone / encoder / decoder / post-process
(the paper's Fig. 1), and (b) stacked horizontal bars of the same split, in GFLOPs, for every row.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

# Part -> (row key, colour). "decoder" = mask projection + transformer decoder (+ any other forward op).
PARTS: tuple[tuple[str, str, str], ...] = (
    ("backbone", "backbone_gflops", "#4C72B0"),
    ("encoder", "encoder_gflops", "#DD8452"),
    ("decoder", "decoder_gflops", "#55A868"),
    ("post-process", "postprocess_gflops", "#8172B3"),
)
BACKBONE_NAMES = {"r50": "R50", "swin_t": "Swin-T"}


def _row_label(row: dict[str, Any]) -> str:
    return f"{BACKBONE_NAMES.get(row['backbone'], row['backbone'])} {row['model']}{' +LPE' if row['lpe'] else ''}"


def compute_distribution_figure(rows: Sequence[dict[str, Any]], size_note: str = "COCO test-time 800x1088"):
    """A matplotlib ``Figure``: M2F pies per backbone on top, stacked GFLOPs bars of all ``rows`` below.

    ``size_note`` names the counting protocol in the x-axis label.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("compute_distribution_figure: no rows to plot")
    pie_rows = [r for r in rows if r["encoder"] == "m2f" and not r["lpe"]]
    bar_height = 0.32
    fig = plt.figure(figsize=(11, 4.2 + bar_height * len(rows)))
    grid = fig.add_gridspec(2, max(len(pie_rows), 1), height_ratios=[3.6, bar_height * len(rows) + 0.6])
    for i, row in enumerate(pie_rows):
        ax = fig.add_subplot(grid[0, i])
        values = [row[key] for _, key, _ in PARTS]
        ax.pie(
            values,
            labels=[name for name, _, _ in PARTS],
            colors=[color for _, _, color in PARTS],
            autopct="%1.2f%%",
            pctdistance=0.72,
            startangle=90,
            counterclock=False,
            wedgeprops={"linewidth": 1, "edgecolor": "white"},
            textprops={"fontsize": 8},
            labeldistance=1.08,
        )
        ax.set_title(f"M2F {BACKBONE_NAMES.get(row['backbone'], row['backbone'])}: {row['total_gflops']:.1f} GFLOPs")
    bars = fig.add_subplot(grid[1, :])
    labels = [_row_label(r) for r in rows]
    positions = list(range(len(rows)))[::-1]
    left = [0.0] * len(rows)
    for name, key, color in PARTS:
        values = [r[key] for r in rows]
        bars.barh(positions, values, left=left, color=color, label=name, height=0.8)
        left = [a + b for a, b in zip(left, values)]
    for y, total in zip(positions, left):
        bars.text(total + 2, y, f"{total:.1f}", va="center", fontsize=7)
    bars.set_yticks(positions, labels, fontsize=7)
    bars.set_xlabel(f"GFLOPs per image ({size_note}; 1 multiply-add = 1 flop)")
    bars.set_xlim(0, max(left) * 1.1)
    bars.set_ylim(-0.6, len(rows) - 0.4)
    bars.legend(loc="lower right", fontsize=8)
    fig.suptitle("Compute distribution: backbone / encoder / decoder / post-process")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave room for the suptitle
    return fig


def compute_distribution_png(
    rows: Sequence[dict[str, Any]], size_note: str = "COCO test-time 800x1088", dpi: int = 120
) -> bytes:
    """The figure of :func:`compute_distribution_figure` encoded as PNG bytes (for atomic writing)."""
    import matplotlib.pyplot as plt

    fig = compute_distribution_figure(rows, size_note)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
