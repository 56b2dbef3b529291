"""Every file the project writes atomically goes through this module: a reader (or a process killed mid-write)
never sees a half-written JSON, PNG, table, plot, checkpoint or weight file.

The pattern: write a temporary file in the destination's folder (same file system, so the rename cannot cross
devices), flush and ``fsync`` it, then ``os.replace`` it over the destination, which POSIX guarantees to be atomic.
A SIGKILL before the rename leaves the old file intact and at most a ``.<name>.tmp-<pid>-<random>`` leftover, which
:func:`remove_stale_temporaries` cleans up. Folders written whole beside other writers, such as the generated dataset,
use :func:`host_temporary_sibling` (host and pid in the name) and :func:`remove_abandoned_siblings`, which removes only
what a dead process of this host left. One name per kind of file:

=============================  ==============================================================
:func:`atomic_write`           any content, given a function that writes to a binary handle
:func:`atomic_write_bytes`     bytes (ONNX graphs, rendered PNGs and figures)
:func:`atomic_write_text`      text (markdown and CSV tables, logs)
:func:`atomic_write_json`      JSON: indented with sorted keys, or ``compact`` (COCO result files)
:func:`atomic_write_png`       an image array as PNG (panoptic / semantic maps, overlays)
:func:`atomic_save_figure`     a matplotlib figure
:func:`atomic_torch_save`      ``torch.save`` (checkpoints, pre-trained backbones)
:func:`atomic_save_safetensors` a tensor dict as ``.safetensors`` (converted weights)
=============================  ==============================================================

:func:`exclusive_lock` serialises processes that would produce the same file (e.g. a cached pre-training).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

TMP_MARKER = ".tmp-"


def temporary_sibling(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<pid>-<random>`` next to ``path``: unique per writer, found by :func:`remove_stale_temporaries`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARKER}{_writer_tag()}")


def _writer_tag() -> str:
    """``<pid>-<random>``: the end of every temporary name (:func:`remove_abandoned_siblings` reads the pid back)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file, then atomically move it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/file system, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, compact: bool = False) -> Path:
    """Write ``data`` as JSON (NaN/inf as Python's ``NaN``/``Infinity`` tokens; tensors, numpy values and paths
    converted): indented with sorted keys for files people read (results, summaries), or ``compact`` (one line,
    keys in their order) for large machine-read files such as COCO results."""
    if compact:
        return atomic_write_text(path, json.dumps(data, default=_json_default))
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_png(path: str | os.PathLike, array: Any) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 / integer array as PNG (PIL)."""
    from PIL import Image

    return atomic_write(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


def atomic_save_figure(path: str | os.PathLike, figure: Any, **savefig_kwargs: Any) -> Path:
    """``figure.savefig`` (format from the suffix unless given) into memory, then one atomic write."""
    buffer = io.BytesIO()
    savefig_kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    figure.savefig(buffer, **savefig_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or unparsable file is a ``ValueError`` that names ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a ``{name: tensor}`` dict (contiguous CPU tensors) as ``.safetensors`` with optional string metadata."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(dict(tensors), metadata=dict(metadata) if metadata else None))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporaries (files and folders) left under ``directory`` by writers that were killed before their
    rename; returns what was removed. Call it where no other writer is active (a run's own folder at its start)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for candidate in sorted(directory.rglob(f".*{TMP_MARKER}*")):
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        elif candidate.exists():
            candidate.unlink(missing_ok=True)
        else:  # inside a folder removed above
            continue
        removed.append(candidate)
    return removed


def _host_prefix(path: Path) -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"
    return f".{path.name}{TMP_MARKER}{host}-"


def host_temporary_sibling(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<host>-<pid>-<random>`` next to ``path``: for writers that share a folder with other
    processes (or other nodes of a shared file system), so :func:`remove_abandoned_siblings` can tell whose it is."""
    path = Path(path)
    return path.with_name(f"{_host_prefix(path)}{_writer_tag()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_abandoned_siblings(path: str | os.PathLike) -> list[Path]:
    """Delete the :func:`host_temporary_sibling` files and folders of ``path`` whose writer was killed (SIGKILL,
    power loss); returns them. Unlike :func:`remove_stale_temporaries` it is safe while other writers run: it
    removes only what this host's processes that no longer exist wrote, never another node's work in progress."""
    path = Path(path)
    prefix = _host_prefix(path)
    removed = []
    for candidate in sorted(path.parent.glob(f"{prefix}*")):
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _json_default(value: Any) -> Any:
    """Make tensors, numpy scalars and paths JSON-serializable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if missing) while the block runs: a second process asking for the
    same lock waits until the first leaves its block (POSIX ``flock``; released by the OS if the holder dies)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
