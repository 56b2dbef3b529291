"""The benchmark's per-part report (proscale/analysis/benchmark_report.py, written by scripts/benchmark.py): the arithmetic that says what the (3,3,3) ratio target
needs, checked on hand-made timings (the benchmark itself is too slow for the suite and is not a timed test)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench():
    from proscale.analysis import benchmark_report

    return benchmark_report


def parts(proj_m, enc_m, tail_m, proj_p, enc_p, tail_p):
    def model(proj, enc, tail):
        return {
            "input_proj": {"ms": proj, "gmacs": 3.0},
            "encoder": {"ms": enc, "gmacs": 80.0},
            "stride4_tail": {"ms": tail, "gmacs": 10.0},
        }

    return {"m2f": model(proj_m, enc_m, tail_m), "proscale333_lpe": model(proj_p, enc_p, tail_p)}


def report(bench, timings, layer_ms, needed, linear_ms=130.0):
    return {
        "parts": timings,
        "max_abs_diff_parts_vs_whole": 0.0,
        "dense_gemm_gmacs": 90.0,
        "full_res_layer_ms": layer_ms,
        "full_res_layer_gmacs": 13.0,
        "full_res_layer_linear_gmacs": 12.8,
        "stage12_in_layers": 0.8,
        "target": 0.55,
        "needed_layer_ms": needed,
        "full_res_queries": 17850,
        "needed_layer_gmac_per_s": 13.0 / (needed / 1000) if needed > 0 else float("nan"),
        "linear_at_dense_gemm_ms": linear_ms,
    }


def test_parts_report_names_the_gap_and_the_closed_layer_route(bench):
    # M2F 40 + 6 x 190 + 400 = 1580 ms; (3,3,3) 40 + 3.8 x 190 + 150 = 912 ms; the target allows 0.55 x 1580 = 869
    timings = parts(40, 1140, 400, 40, 722, 150)
    layer = 1140 / 6
    needed = (0.55 * (40 + 400) - (40 + 150)) / (3.8 - 6 * 0.55)
    text = " ".join(bench.parts_markdown(report(bench, timings, layer, needed)))
    assert "| sum | 1580 | | | 912 | | |" in text
    assert "allows the (3,3,3) decoder 869 ms, which is 43 ms less than it takes" in text
    assert f"full-resolution layer of **{needed:.0f} ms**" in text and "so that route is closed" in text


def test_parts_report_when_faster_layers_would_do_and_when_the_target_is_met(bench):
    timings = parts(40, 1140, 400, 40, 722, 150)
    text = " ".join(bench.parts_markdown(report(bench, timings, 190.0, 150.0, linear_ms=100.0)))
    assert "leaving 50 ms for the deformable sampling" in text and "17,850 queries" in text
    met = " ".join(bench.parts_markdown(report(bench, parts(40, 1140, 400, 40, 600, 150), 190.0, 250.0)))
    assert "which its parts meet." in met and "route" not in met and "leaving" not in met
