"""CPU thread settings that keep a run fast when other processes share the cores.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the pip wheels), one thread per core by default. After
each parallel region libgomp's threads spin-wait for the next one, which is cheap alone but ruinous when another
process wants the same cores: two 2-thread trainings on 2 cores slowed each other ~25x (benchmarks/shared_cpu.md), each one's
spinning threads taking the time slices the other's working threads needed. ``OMP_WAIT_POLICY=PASSIVE`` makes idle
threads sleep instead, so side-by-side runs share the cores instead of fighting over them. The variable is read once,
when torch loads its OpenMP runtime, hence :func:`apply_thread_env_defaults` runs in :mod:`proscale.cli` before
anything imports torch. A value the user exported wins (``OMP_WAIT_POLICY=ACTIVE`` for a machine of one's own);
``scripts/measure_shared_cpu.py`` measures the choices.

``num_threads`` (every app's config) caps torch's intra-op threads per process: ``null`` = torch's default (one per
core the process may use); on a shared machine ``num_threads=1`` per process is the safe choice.
"""

from __future__ import annotations

import os

DEFAULT_WAIT_POLICY = "PASSIVE"


def apply_thread_env_defaults() -> None:
    """Set ``OMP_WAIT_POLICY`` (unless the user did) before torch is imported; no effect once it is.
    ``OMP_WAIT_POLICY=default`` removes the variable: the OpenMP runtime's own default (libgomp: spin, then sleep),
    as before this setting existed (for measurements)."""
    if os.environ.get("OMP_WAIT_POLICY", "").lower() == "default":
        del os.environ["OMP_WAIT_POLICY"]
        return
    os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)


def set_num_threads(num_threads: int | str | None) -> None:
    """Cap torch's intra-op threads (``num_threads`` of the app's config; ``None`` leaves torch's default)."""
    if num_threads is None:
        return
    try:
        count = int(num_threads)
    except (TypeError, ValueError):
        raise ValueError(f"num_threads must be a positive integer or null, got {num_threads!r}") from None
    if count < 1:
        raise ValueError(f"num_threads must be a positive integer or null, got {num_threads!r}")
    import torch

    torch.set_num_threads(count)
