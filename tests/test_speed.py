"""The timing utilities on tiny work (no timed assertions: the machine is shared)."""

import pytest
import torch

from proscale.analysis.speed import Timing, dense_gemm_gmacs, machine_info, peak_memory, time_fn


def test_time_fn_runs_warmup_then_repeats_and_takes_the_median():
    calls = []
    timing = time_fn(lambda: calls.append(1), warmup=2, repeats=5, batch_size=4)
    assert len(calls) == 7 and len(timing.runs_ms) == 5
    assert timing.median_ms == sorted(timing.runs_ms)[2]
    assert timing.per_image_ms == pytest.approx(timing.median_ms / 4)
    assert Timing(median_ms=10.0, batch_size=2).images_per_s == pytest.approx(200.0)


def test_time_fn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="batch_size"):
        time_fn(lambda: None, batch_size=0)


def test_peak_memory_counts_the_largest_live_set_on_cpu():
    def two_then_one():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # +2 MB -> 6 MB live
        del a, b
        c = torch.empty(250_000)  # 1 MB
        del c

    peak = peak_memory(two_then_one, "cpu")
    assert 6_000_000 <= peak < 6_100_000
    assert peak_memory(lambda: None, "cpu") == 0


def test_peak_memory_rejects_unknown_devices():
    with pytest.raises(ValueError, match="cpu and cuda"):
        peak_memory(lambda: None, "meta")


def test_dense_gemm_probe_and_machine_info():
    gmacs = dense_gemm_gmacs(size=64, repeats=2)
    assert gmacs > 0
    info = machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert {"date_utc", "cpu", "cpu_cores", "device"} <= set(info)


def test_cpu_clock_counts_work_not_waiting():
    import time

    wall = time_fn(lambda: time.sleep(0.05), warmup=0, repeats=1)
    cpu = time_fn(lambda: time.sleep(0.05), warmup=0, repeats=1, clock="cpu")
    assert wall.median_ms >= 50 > cpu.median_ms  # sleeping takes time but no CPU
    with pytest.raises(ValueError, match="clock"):
        time_fn(lambda: None, clock="gpu")
