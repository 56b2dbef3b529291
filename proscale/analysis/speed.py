"""Measured speed and memory, the same way everywhere (benchmarks, training logs, tables).

- :func:`time_fn`: median wall time of repeated runs after warm-up (CUDA synchronized around every run),
  optionally per image; or median process CPU time (``clock="cpu"``) for single-threaded runs on a
  machine shared with other jobs.
- :func:`peak_memory`: peak bytes of tensor memory allocated by one call, above what was allocated
  before it. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation/free events of the PyTorch
  profiler (``profile_memory=True``) summed in time order -- the CPU analogue of ``max_memory_allocated``.
  Process RSS (psutil / tracemalloc) is not used: glibc keeps freed memory and tracemalloc does not see
  PyTorch's allocator, so neither measures what an op needs.
- :func:`dense_gemm_gmacs`: achieved GMAC/s of a large square matmul, the machine's practical peak that
  model throughput is compared against (``benchmarks/RESULTS.md``).
- :func:`machine_info`: what a benchmark report must state (CPU, threads, torch version, date, load).

Everything takes a zero-argument callable; wrap arguments with a lambda or ``functools.partial``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    """Result of :func:`time_fn`.

    median_ms: median wall time of one call; runs_ms: every timed run (after warm-up);
    per_image_ms: ``median_ms / batch_size``.
    """

    median_ms: float
    runs_ms: list[float] = field(default_factory=list)
    batch_size: int = 1

    @property
    def per_image_ms(self) -> float:
        return self.median_ms / self.batch_size

    @property
    def images_per_s(self) -> float:
        return 1000.0 / self.per_image_ms if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "per_image_ms": self.per_image_ms}


def _device_of(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    device = _device_of(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def time_fn(
    fn: Callable[[], object],
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    min_time_s: float = 0.0,
    clock: str = "wall",
) -> Timing:
    """Median time of ``fn()`` over ``repeats`` runs (at least ``min_time_s`` in total) after ``warmup``.

    ``clock="wall"`` (default) measures elapsed time. ``clock="cpu"`` measures this process's CPU time
    instead: on a CPU shared with other jobs it counts the work done rather than the time-slices lost
    to others, and equals wall time on an idle machine -- meaningful only for single-threaded runs
    (``torch.set_num_threads(1)``; with more threads it sums their time, spin-waits included) and never
    for CUDA work. Raises ``ValueError`` for ``repeats < 1``, ``warmup < 0``, ``batch_size < 1`` or an
    unknown clock.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        fn()
    synchronize(device)
    runs = []
    started = time.perf_counter()
    while len(runs) < repeats or (time.perf_counter() - started) < min_time_s:
        t0 = now()
        fn()
        synchronize(device)
        runs.append((now() - t0) * 1000.0)
    return Timing(median_ms=statistics.median(runs), runs_ms=runs, batch_size=batch_size)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def peak_memory(fn: Callable[[], object], device: str | torch.device | None = None) -> int:
    """Peak tensor bytes allocated during one ``fn()`` call, above the bytes allocated before it.

    Objects ``fn`` returns are counted (they are alive at the end); free them in ``fn`` if they should not.
    """
    device = _device_of(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    raise ValueError(f"peak_memory supports cpu and cuda devices, got {device}")


def dense_gemm_gmacs(
    size: int = 2048,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    warmup: int = 1,
    repeats: int = 5,
    clock: str = "wall",
) -> float:
    """Achieved GMAC/s (1e9 multiply-adds per second) of a ``size`` x ``size`` x ``size`` matmul (median)."""
    device = _device_of(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    timing = time_fn(lambda: torch.mm(a, b, out=out), warmup=warmup, repeats=repeats, device=device, clock=clock)
    return size**3 / (timing.median_ms / 1000.0) / 1e9


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device | None = None) -> dict:
    """CPU model, cores, torch threads, torch version, UTC date, load average and the accelerator name."""
    device = _device_of(device)
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


__all__ = ["Timing", "dense_gemm_gmacs", "machine_info", "peak_memory", "synchronize", "time_fn"]
