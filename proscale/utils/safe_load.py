"""Reading files that may come from strangers without running code from them.

Every file the project reads that could hold a pickle goes through here:

- :func:`torch_load` -- ``torch.load(..., weights_only=True)`` with the few plain classes this project's own
  checkpoints hold allow-listed; a file that needs anything else is refused with :class:`UnsafeFileError`,
  which names the file, what it wanted to import and the opt-in (``allow_unsafe_load=true`` / ``--unsafe``)
  for files the user trusts.
- :func:`load_pickle` -- a ``pickle.Unpickler`` whose ``find_class`` only returns numpy's array/dtype
  reconstruction, ``collections.OrderedDict`` and plain builtins (detectron2 / Mask2Former ``.pkl`` files are
  ``{"model": {name: ndarray}}``); anything else raises :class:`UnsafeFileError`.

safetensors files cannot hold code and need nothing from here.
"""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path
from typing import Any

import torch

UNSAFE_OPT_IN = "allow_unsafe_load=true (Hydra apps) / --unsafe (scripts/convert_weights.py)"


class UnsafeFileError(ValueError):
    """A file needed arbitrary unpickling (it may run code) and the user did not opt in."""


def _refusal(path: str | os.PathLike, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"refusing to load {path}: it needs {what}, which could run code from the file. Only load files you "
        f"trust that way: pass {UNSAFE_OPT_IN}. Files this project writes never need it."
    )


# numpy pickles arrays through these; the module moved from numpy.core to numpy._core in numpy 2.
_NUMPY_GLOBALS = (
    {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    | {
        (module, "_frombuffer")
        for module in ("numpy.core.numeric", "numpy._core.numeric")  # pickle protocol 5
    }
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)
_BUILTIN_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bool"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),  # numpy arrays pickled by Python 2 / with protocol 2 carry their bytes through it
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, dicts, lists and scalars; refuses every other global."""

    def __init__(self, file: Any, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS | _BUILTIN_GLOBALS:
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy >= 1.25 dtype classes
            return super().find_class(module, name)
        raise _refusal(self._path, f"the Python global {module}.{name}")


def load_pickle(path: str | os.PathLike, allow_unsafe: bool = False) -> Any:
    """Read a ``.pkl`` weight file: numpy arrays and containers only unless ``allow_unsafe``."""
    with Path(path).open("rb") as f:
        if allow_unsafe:
            return pickle.load(f, encoding="latin1")  # noqa: S301 - the user opted in for this file
        return RestrictedUnpickler(f, path, encoding="latin1").load()


TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a non-zip (legacy) torch.save file


def file_kind(path: str | os.PathLike, what: str = "weights") -> str:
    """``safetensors`` | ``zip`` (torch.save) | ``pickle`` (a ``.pkl``, or torch.save's legacy format) from the first
    bytes; a ``ValueError`` naming ``what`` and the file for anything else."""
    with Path(path).open("rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] in (b"\x80", b"(", b"}", b"]"):  # protocol >= 2, or a dict / list / tuple in protocol 0 / 1
        return "pickle"
    raise ValueError(
        f"{what} {path}: unknown format (not safetensors, a torch.save file or a pickle; first bytes {head[:8]!r})"
    )


def load_pickled(path: str | os.PathLike, kind: str, allow_unsafe: bool = False) -> Any:
    """The object of a ``zip`` or ``pickle`` file (:func:`file_kind`) through the safe loaders: torch.save files
    (zip, or legacy: a pickled magic number first) with :func:`torch_load`, plain pickles with :func:`load_pickle`."""
    if kind == "zip":
        return torch_load(path, allow_unsafe=allow_unsafe)
    first = load_pickle(path, allow_unsafe=allow_unsafe)
    if isinstance(first, int) and first == TORCH_LEGACY_MAGIC:
        return torch_load(path, allow_unsafe=allow_unsafe)
    return first


def _safe_globals() -> list[Any]:
    """Plain classes this project's checkpoints may hold besides tensors and builtins."""
    from lightning.fabric.utilities.data import AttributeDict

    return [collections.OrderedDict, collections.defaultdict, AttributeDict]


def torch_load(
    path: str | os.PathLike, allow_unsafe: bool = False, map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """``torch.load`` restricted to tensors, containers and allow-listed plain classes.

    Raises :class:`UnsafeFileError` (a ``ValueError``) when the file needs anything else, unless
    ``allow_unsafe``; other read errors propagate unchanged for the caller to wrap with its context.
    """
    if allow_unsafe:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch words the refused global as "Unsupported global: GLOBAL module.name" (or a forbidden opcode)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused_global = next((line for line in lines if "GLOBAL" in line), None)
        if refused_global:
            raise _refusal(path, f"unrestricted unpickling ({refused_global})") from None
        if "Weights only load failed" in str(error) or any("Unsupported" in line for line in lines):
            # an opcode outside the safe subset: a corrupt file, or one written in a way only full pickle reads
            detail = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
            raise ValueError(
                f"cannot read {path}: not a valid torch file, or one that needs unrestricted unpickling ({detail}). "
                f"If it is a file you trust, pass {UNSAFE_OPT_IN}."
            ) from None
        raise


__all__ = [
    "TORCH_LEGACY_MAGIC",
    "RestrictedUnpickler",
    "UnsafeFileError",
    "UNSAFE_OPT_IN",
    "file_kind",
    "load_pickle",
    "load_pickled",
    "torch_load",
]
