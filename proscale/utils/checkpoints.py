"""Checkpoint look-up (``ckpt_path=last``) and an architecture check with a readable mismatch report."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from torch import nn

from proscale.utils.safe_load import UnsafeFileError, torch_load

LAST_NAME = "last.ckpt"
MAX_LISTED_KEYS = 15


def latest_last_checkpoint(runs_dir: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Path | None:
    """Newest ``<runs_dir>/<run>/checkpoints/last.ckpt`` by modification time (runs of one experiment)."""
    runs_dir = Path(runs_dir)
    excluded = Path(exclude).resolve() if exclude else None
    candidates = [
        path
        for path in runs_dir.glob(f"*/checkpoints/{LAST_NAME}")
        if excluded is None or path.parent.parent.resolve() != excluded
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str | os.PathLike, output_dir: str | None = None) -> str | None:
    """``None`` -> ``None``; ``"last"`` -> the latest ``last.ckpt`` of the experiment's runs; else an existing file.

    Raises ``ValueError`` naming what was searched when nothing fits.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if str(ckpt_path) == "last":
        found = latest_last_checkpoint(runs_dir, exclude=output_dir)
        if found is None:
            raise ValueError(
                f"ckpt_path=last: no earlier run of this experiment has a checkpoint ({runs_dir}/*/checkpoints/"
                f"{LAST_NAME} matches nothing). Check experiment_name / paths.log_dir, or pass a file path."
            )
        return str(found)
    if not Path(ckpt_path).is_file():
        raise ValueError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(ckpt_path)


def load_checkpoint_cpu(path: str | os.PathLike, allow_unsafe: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint on CPU (memory-mapped, so peeking at a big file is cheap).

    Safe by default (``weights_only`` with the project's plain classes allowed): a file that needs arbitrary
    unpickling raises :class:`~proscale.utils.safe_load.UnsafeFileError` naming it and the opt-in."""
    try:
        # torch can memory-map only its zip format; older or foreign files are read whole
        return torch_load(path, allow_unsafe=allow_unsafe, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except UnsafeFileError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None


def check_state_dict_fits(module: nn.Module, checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise ``ValueError`` listing missing / unexpected / differently shaped keys when the checkpoint's
    ``state_dict`` was made by a different architecture than ``module``."""
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' key; keys: {list(checkpoint)[:10]})")
    from proscale.convert.io import fit_report

    report = fit_report(module, checkpoint["state_dict"])
    if report.ok:
        return
    trained_with = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    hint = ""
    if trained_with:
        encoder = trained_with.get("encoder") or {}
        hint = f" The checkpoint's model config: encoder {encoder}."
    raise ValueError(
        f"checkpoint {path} does not fit the configured model (a different architecture?): "
        + report.describe(limit=MAX_LISTED_KEYS)
        + "."
        + hint
        + " Use the same model/experiment overrides as the run that wrote it."
    )
