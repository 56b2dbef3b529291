"""Text outputs of the compute table: a printable / markdown table, CSV, and atomic file writes."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

# (column key, header, format) of the printed / markdown table; CSV keeps every key at full precision.
DISPLAY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("backbone", "backbone", "{}"),
    ("model", "model", "{}"),
    ("lpe", "LPE", "{}"),
    ("backbone_gflops", "backbone G", "{:.2f}"),
    ("encoder_gflops", "encoder G", "{:.2f}"),
    ("encoder_layers_gflops", "enc. layers G", "{:.2f}"),
    ("decoder_gflops", "decoder G", "{:.2f}"),
    ("postprocess_gflops", "post-proc. G", "{:.2f}"),
    ("total_gflops", "total G", "{:.2f}"),
    ("params_m", "params M", "{:.2f}"),
    ("encoder_reduction_pct", "enc. red. %", "{:.2f}"),
    ("total_reduction_pct", "total red. %", "{:.2f}"),
)
MS_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("encoder_ms", "encoder ms", "{:.1f}"),
    ("forward_ms", "forward ms", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def display_columns(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    """The table columns, with measured-time columns only when some row has them."""
    extra = tuple(c for c in MS_COLUMNS if any(c[0] in row for row in rows))
    return DISPLAY_COLUMNS + extra


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] | None = None) -> str:
    """A GitHub-markdown table of ``rows``."""
    columns = display_columns(rows) if columns is None else columns
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" if fmt.startswith("{:") else "---" for _, _, fmt in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def paper_numbers_markdown(comparison: Sequence[dict[str, Any]]) -> str:
    lines = ["| quantity | paper | measured | difference (points) |", "|---|---:|---:|---:|"]
    for item in comparison:
        lines.append(f"| {item['name']} | {item['paper']:.2f} | {item['measured']:.2f} | {item['difference']:+.2f} |")
    return "\n".join(lines) + "\n"


def paper_numbers_text(comparison: Sequence[dict[str, Any]]) -> str:
    width = max(len(item["name"]) for item in comparison)
    lines = [f"{'paper number':<{width}}  {'paper':>7}  {'ours':>7}  {'diff':>6}"]
    for item in comparison:
        lines.append(
            f"{item['name']:<{width}}  {item['paper']:7.2f}  {item['measured']:7.2f}  {item['difference']:+6.2f}"
        )
    return "\n".join(lines)


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
