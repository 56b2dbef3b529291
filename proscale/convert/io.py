"""Reading and writing checkpoint files, and loading a state dict into a model with a key report.

Formats read by :func:`read_state_dict`:
- ``.pkl``: detectron2 / Mask2Former model-zoo pickles, a dict of numpy arrays under ``"model"``;
- ``.pth`` / ``.pt`` / ``.ckpt``: ``torch.save`` files; a Lightning checkpoint's ``"state_dict"`` or a
  ``"model"`` entry is unwrapped;
- ``.safetensors``.
Pickles never run code unless the caller opts in (:mod:`proscale.utils.safe_load`). Finding the format by content
and the model it needs: :func:`proscale.weights.read_weights`.
Every failure raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from proscale.utils.io import atomic_save_safetensors, atomic_torch_save
from proscale.utils.safe_load import UnsafeFileError, load_pickle, torch_load

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def read_state_dict(path: str | os.PathLike, allow_unsafe: bool = False) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (see the module docstring).

    Pickles load safely (:mod:`proscale.utils.safe_load`): a file that needs arbitrary unpickling raises
    :class:`~proscale.utils.safe_load.UnsafeFileError` naming it, unless ``allow_unsafe``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pkl":
            raw = load_pickle(path, allow_unsafe=allow_unsafe)
        elif suffix in TORCH_SUFFIXES:
            raw = torch_load(path, allow_unsafe=allow_unsafe)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raise ValueError(f"unknown checkpoint format {suffix!r} (use .pkl, .pth, .pt, .ckpt or .safetensors)")
    except UnsafeFileError:
        raise
    except ValueError as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    except Exception as err:  # corrupt / truncated files raise many different types
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    return as_tensor_dict(_unwrap(raw, path), path)


def _unwrap(raw: object, path: Path) -> Mapping:
    if not isinstance(raw, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(raw).__name__}, not a dict of tensors")
    for key in ("state_dict", "model"):
        inner = raw.get(key)
        if isinstance(inner, Mapping):
            return inner
    return raw


def as_tensor_dict(raw: Mapping, path: str | os.PathLike, what: str = "checkpoint") -> dict[str, Tensor]:
    """``{name: Tensor | ndarray}`` -> ``{name: Tensor}`` (numpy arrays copied to writable C-ordered tensors; 0-d
    stays 0-d); ValueError naming ``what`` + ``path`` for an entry that is no array, or for no entries at all."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value, order="C"))
        if not isinstance(value, Tensor):
            raise ValueError(f"{what} {path}: entry {key!r} is a {type(value).__name__}, not an array")
        out[str(key)] = value
    if not out:
        raise ValueError(f"{what} {path} contains no tensors")
    return out


def write_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` as ``.safetensors`` or (any other suffix) ``torch.save``, atomically:
    the file appears complete or not at all."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix.lower() == ".safetensors":
        return atomic_save_safetensors(path, tensors)
    return atomic_torch_save(tensors, path)


def strip_common_prefix(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Remove each prefix in turn when *every* key carries it (e.g. ``module.`` from DDP)."""
    state = dict(state)
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


IGNORED_SUFFIXES = ("num_batches_tracked",)  # BatchNorm's step counter: absent from FrozenBN checkpoints


@dataclass
class LoadReport:
    """Keys of a load: ``missing`` (model has, checkpoint lacks), ``unused`` (checkpoint has, model lacks),
    ``mismatched`` (name, checkpoint shape, model shape)."""

    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        """``N missing (names); N unexpected (names); N reshaped (name shape vs model shape)``, at most ``limit``
        names each: the one wording of every key-mismatch message (weights, checkpoints, conversions)."""

        def names(items: list) -> str:
            shown = ", ".join(str(i) for i in items[:limit])
            return f" ({shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''})" if items else ""

        reshaped = [f"{key} {theirs} vs model {ours}" for key, theirs, ours in self.mismatched]
        return (
            f"{len(self.missing)} missing{names(self.missing)}; {len(self.unused)} unexpected{names(self.unused)}; "
            f"{len(reshaped)} reshaped{names(reshaped)}"
        )

    def __str__(self) -> str:
        return self.describe()


def fit_report(model: nn.Module, state: Mapping[str, Tensor]) -> LoadReport:
    """Missing / unused / mis-shaped keys of ``state`` for ``model`` (BatchNorm step counters never count)."""
    target = model.state_dict()
    report = LoadReport()
    report.missing = [k for k in target if k not in state and not k.endswith(IGNORED_SUFFIXES)]
    report.unused = [k for k in state if k not in target and not k.endswith(IGNORED_SUFFIXES)]
    report.mismatched = [
        (key, tuple(value.shape), tuple(target[key].shape))
        for key, value in state.items()
        if key in target and tuple(value.shape) != tuple(target[key].shape)
    ]
    return report


def load_into(model: nn.Module, state: Mapping[str, Tensor], allow_partial: bool = False) -> LoadReport:
    """Copy ``state`` into ``model`` and report missing / unused / mis-shaped keys.

    Raises ValueError listing them unless ``allow_partial``; then every fitting key is loaded and the
    report returned. BatchNorm ``num_batches_tracked`` counters are never reported.
    """
    report = fit_report(model, state)
    if not report.ok and not allow_partial:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: {report}")
    reshaped = {key for key, _, _ in report.mismatched}
    target = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in target and k not in reshaped}, strict=False)
    return report


__all__ = [
    "LoadReport",
    "as_tensor_dict",
    "fit_report",
    "load_into",
    "read_state_dict",
    "strip_common_prefix",
    "write_state_dict",
]
