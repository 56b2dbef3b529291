"""Keep freed CPU memory for reuse instead of handing it back to the OS after every large tensor.

glibc's ``malloc`` serves blocks above its mmap threshold (dynamic, at most 32 MB) with a fresh ``mmap`` and
unmaps them on ``free``; it also trims the top of the heap once more than twice that is free. PyTorch's CPU
allocator sits directly on ``malloc``, so every large activation of a high-resolution forward pass is new
memory: the kernel maps and zeroes it page by page on first touch. Measured on this project's 2-core CPU
(R50, 800x1088, pixel decoder forward, ``ru_minflt``): ~264,000 minor page faults per M2F pixel-decoder
forward (~1 GB of fresh pages) and ~135,000 for PRO-SCALE (3,3,3), i.e. a large part of the time outside
the GEMMs; with the settings below, ~0-12,000.

:func:`retain_freed_memory` raises both thresholds (``mallopt``) so large blocks come from the heap and
stay there after ``free``: the next forward pass reuses warm pages. (Reuse is not perfect: PyTorch asks for
64-byte aligned blocks, which do not fit into a freed block of exactly the same size, so a repeated pattern
may extend the heap a few times before freed neighbours coalesce.) The price is that the process keeps
its peak memory until it exits (as PyTorch's CUDA caching allocator does on the GPU). The training,
evaluation, prediction and benchmark entry points call it; ``PROSCALE_RETAIN_FREED_MEMORY=0`` turns it
off. Only glibc (Linux) is touched; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "PROSCALE_RETAIN_FREED_MEMORY"
# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap (glibc caps the value it accepts; 512 MB is accepted by the
# glibc versions we run on, and anything larger than a typical activation is fine).
MMAP_THRESHOLD_BYTES = 512 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 2**31 - 1

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Apply the ``mallopt`` settings once per process; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied


__all__ = ["ENV_VAR", "retain_freed_memory"]
