"""Checking a split's annotations and files once, at setup, so that bad data fails before training starts.

The dataset readers call these while they index a split (JSON structure, ids, categories: no file is opened)
and from their ``check_files`` method, which the datamodule runs at setup (``data.validate``, default on):
every referenced file must exist and its size, read from the image header (no decoding), must match the JSON and
the label map. ``data.verify_images=true`` also decodes every image and label map up front (slow on COCO: minutes).

Problems are collected, not raised one at a time: :class:`DataValidationError` lists the first
:data:`MAX_LISTED` of them and their total count, so one run shows how much of the dataset is affected.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

MAX_LISTED = 10
# EXIF orientations that rotate by 90 degrees: the displayed (and annotated) size is the stored one transposed
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class DataValidationError(ValueError):
    """Bad annotations or files; the message lists the first problems and how many there are."""


class Problems:
    """Collects problem lines about ``source`` (a file or folder); ``raise_if_any`` turns them into one error."""

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self.lines)

    def raise_if_any(self, hint: str = "") -> None:
        if not self.lines:
            return
        count = len(self.lines)
        shown = "\n".join(f"  - {line}" for line in self.lines[:MAX_LISTED])
        more = f"\n  ... and {count - MAX_LISTED} more" if count > MAX_LISTED else ""
        noun = "problem" if count == 1 else "problems"
        raise DataValidationError(f"{self.source}: {count} {noun} in the data:\n{shown}{more}{hint}")


def require_json_object(data: Any, path: Path, lists: Iterable[str]) -> dict:
    """``data`` (a parsed annotation JSON) must be an object whose keys ``lists`` are lists."""
    if not isinstance(data, dict):
        raise DataValidationError(
            f"{path}: the top level of an annotation JSON must be an object with {', '.join(map(repr, lists))}; "
            f"got a {type(data).__name__}"
        )
    missing = [key for key in lists if not isinstance(data.get(key), list)]
    if missing:
        raise DataValidationError(f"{path}: needs {' and '.join(map(repr, missing))} as lists")
    return data


def check_image_entries(images: list, path: Path, problems: Problems, fields: tuple[str, ...]) -> None:
    """Each entry of ``images`` is an object with ``fields``; image ids are unique (a duplicate would pair an image
    with another image's labels: the annotation index keeps only one of them)."""
    for index, image in enumerate(images):
        if not isinstance(image, dict) or any(field not in image for field in fields):
            problems.add(f"{path}: images[{index}] needs {', '.join(fields)}: {str(image)[:120]}")
    ids = collections.Counter(image.get("id") for image in images if isinstance(image, dict))
    for image_id, count in ids.items():
        if count > 1:
            names = [str(im.get("file_name")) for im in images if isinstance(im, dict) and im.get("id") == image_id]
            problems.add(f"{path}: image id {image_id!r} is used by {count} images ({', '.join(names[:4])})")


def duplicates(values: Iterable[Any]) -> list[Any]:
    """Values that occur more than once, in first-seen order."""
    counts = collections.Counter(values)
    return [value for value, count in counts.items() if count > 1]


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as displayed (EXIF rotation applied) from its header, without decoding it.

    Raises ``ValueError`` naming the file when it cannot be identified.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG) if path.suffix.lower() != ".png" else None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    if orientation in _TRANSPOSING_ORIENTATIONS:
        height, width = width, height
    return height, width


def check_file(
    path: Path, what: str, problems: Problems, expected: tuple[int, int] | None, against: str
) -> tuple[int, int] | None:
    """``path`` exists and its header size equals ``expected`` (when given); problems are added, not raised.
    Returns the size read (None when the file is missing or unreadable)."""
    if not path.is_file():
        problems.add(f"{path}: {what} file is missing")
        return None
    try:
        size = header_size(path)
    except ValueError as error:
        problems.add(str(error))
        return None
    if expected is not None and tuple(size) != tuple(expected):
        problems.add(
            f"{path}: {what} size {size[0]}x{size[1]} (h x w) does not match {against} {expected[0]}x{expected[1]}"
        )
    return size


def decode_all(readers: Iterable[tuple[Path, Callable[[Path], Any]]], problems: Problems) -> None:
    """``verify_images``: decode every file with its reader; a reader's ``ValueError`` becomes a problem."""
    for path, read in readers:
        if not path.is_file():
            continue  # already reported by check_file
        try:
            read(path)
        except ValueError as error:
            problems.add(str(error))


VALIDATION_HINT = (
    "\n(checked at setup: data.validate=false skips the file checks, data.verify_images=true also decodes "
    "every image; see docs/datasets.md, data validation)"
)
