"""Rich console output: the composed config as a tree at start, the final metrics as a table at the end."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.table
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from proscale.utils.io import atomic_write_text

CONFIG_PRINT_ORDER = ("data", "model", "module", "callbacks", "logger", "trainer", "paths", "extras")


@rank_zero_only
def print_config_tree(cfg: DictConfig, order: Sequence[str] = CONFIG_PRINT_ORDER, save_to: str | None = None) -> None:
    """Print the composed config as a tree (top groups first in ``order``); optionally save it as text."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    for field in fields:
        branch = tree.add(field, style="bold", guide_style="dim")
        value = cfg[field]
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to is not None:
        with rich.get_console().capture() as capture:
            rich.print(tree)
        atomic_write_text(Path(save_to), capture.get())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


@rank_zero_only
def print_metrics_table(results: dict[str, Any], title: str = "Final metrics") -> None:
    """Print metrics (0-100), compute numbers and the results path as a two-column table."""
    table = rich.table.Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "AP", "AP50", "AP75", "mIoU", "pAcc"):
        if results.get(key) is not None:
            table.add_row(key, _format(results[key]))
    for key, label in (
        ("encoder_gflops", "encoder GFLOPs"),
        ("total_gflops", "total GFLOPs"),
        ("params", "params (M)"),
        ("ms_per_img", "ms / img"),
        ("wall_time_s", "wall time (s)"),
    ):
        value = results.get(key)
        if value is None:
            continue
        table.add_row(label, _format(value / 1e6 if key == "params" else value))
    rich.print(table)
