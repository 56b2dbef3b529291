"""The speed benchmark's report (``scripts/benchmark.py`` measures, this module writes): the targets, the markdown
of ``benchmarks/RESULTS.md`` with its per-part analysis, and the writer that keeps the file's hand-written notes.

``markdown(bench, info, command)`` reads ``bench.values`` (the measured numbers by key), ``bench.errors``,
``bench.quick`` and ``bench.image_size``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from proscale.models.ops.ms_deform_attn import get_default_impl
from proscale.utils.io import atomic_write_text

# (key, description, comparison, target): the speed targets, checked in the report
TARGETS = [
    ("op_fwd_speedup", "deformable-attention op forward, HF time / ours", ">=", 2.0),
    ("op_fwdbwd_speedup", "deformable-attention op forward+backward, HF time / ours", ">=", 1.5),
    ("op_peak_mem_ratio", "op peak memory (forward+backward), ours / HF", "<=", 1.0),
    ("pixdec_time_ratio_vs_hf", "M2F pixel decoder R50, ours / HF", "<=", 0.6),
    ("proscale333_pixdec_time_ratio", "PRO-SCALE (3,3,3)+LPE pixel decoder / our M2F's", "<=", 0.55),
    ("proscale333_model_time_ratio", "PRO-SCALE (3,3,3)+LPE whole model / our M2F's", "<=", 0.80),
    ("encoder_gemm_fraction", "lowest encoder GMAC/s / dense-GEMM GMAC/s", ">=", 0.60),
]


GEMM_SIZE_NOTE = "fp32 square matmul, timed round-robin with the pixel decoders below"
MODELS = {  # name -> build_model kwargs
    "m2f": {"encoder": "m2f"},
    "proscale111_lpe": {"encoder": "proscale", "schedule": (1, 1, 1), "lpe": True},
    "proscale333_lpe": {"encoder": "proscale", "schedule": (3, 3, 3), "lpe": True},
}

PARTS = ("input_proj", "encoder", "stride4_tail")
PARTS_MODELS = ("m2f", "proscale333_lpe")


def fmt(value, digits=2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def target_rows(values: dict) -> tuple[list[str], list[str]]:
    rows, missed = [], []
    for key, text, op, target in TARGETS:
        value = values.get(key)
        if value is None:
            rows.append(f"| {text} | `{key}` | {op} {target} | not measured | - |")
            missed.append(key)
            continue
        ok = value >= target if op == ">=" else value <= target
        rows.append(f"| {text} | `{key}` | {op} {target} | {value:.3f} | {'met' if ok else '**missed**'} |")
        if not ok:
            missed.append(key)
    return rows, missed


def markdown(bench: Any, info: dict, command: str) -> str:
    v = bench.values
    rows, missed = target_rows(v)
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command}`" + (" (**quick mode: reduced sizes, indicative only**)" if bench.quick else ""),
        "",
        "| machine | value |",
        "|---|---|",
        *[f"| {k} | {fmt(val)} |" for k, val in info.items()],
        "",
        "Each time is the median of repeated runs after one warm-up, all in this one run (clock: wall = elapsed"
        " time; cpu = process CPU time of a single-threaded run, robust to other jobs on the machine). Peak memory is the",
        "peak of tensor memory allocated during one call (CPU: PyTorch profiler allocation events; CUDA:",
        "`max_memory_allocated`). Other processes shared the CPU when the load average above exceeds the",
        "core count: absolute times are then inflated and drift with the load; compared candidates are timed"
        " round-robin (interleaved repeats) so that drift affects them alike.",
        "",
        "## Targets",
        "",
        "| what | key | target | measured | |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    if "op_ours_fwd_ms" in v:
        s = v["op_shapes"]
        lines += [
            "## Deformable-attention op",
            "",
            f"Shapes: levels {s['levels']}, {s['queries']} queries, {s['heads']} heads x {s['head_dim']} ch, 4 points,"
            f" batch 1, fp32. Ours = `{get_default_impl()}` kernel; HF = transformers'"
            " `multi_scale_deformable_attention` (grid_sample per level). Max |ours - HF| ="
            f" {v['op_max_abs_diff_vs_hf']:.2e}.",
            "",
            "| | ours | HF | HF / ours |",
            "|---|---|---|---|",
            f"| forward (ms) | {v['op_ours_fwd_ms']:.1f} | {v['op_hf_fwd_ms']:.1f} | {v['op_fwd_speedup']:.2f}x |",
            f"| forward+backward (ms) | {v['op_ours_fwdbwd_ms']:.1f} | {v['op_hf_fwdbwd_ms']:.1f} |"
            f" {v['op_fwdbwd_speedup']:.2f}x |",
            f"| peak memory, forward (MB) | {v['op_ours_fwd_peak_mb']:.1f} | {v['op_hf_fwd_peak_mb']:.1f} |"
            f" {1 / v['op_fwd_peak_mem_ratio']:.2f}x |",
            f"| peak memory, forward+backward (MB) | {v['op_ours_fwdbwd_peak_mb']:.1f} |"
            f" {v['op_hf_fwdbwd_peak_mb']:.1f} | {1 / v['op_peak_mem_ratio']:.2f}x |",
            "",
        ]
    if "pixdec_ours_ms" in v:
        lines += [
            "## Pixel decoder, ResNet-50 features, ours (M2F) vs HF, identical weights",
            "",
            f"Same converted weights, same random backbone features; max |ours - HF| of the mask features ="
            f" {v['pixdec_max_abs_diff_vs_hf']:.2e}.",
            "",
            "| | ms |",
            "|---|---|",
            f"| HF `Mask2FormerPixelDecoder` | {v['pixdec_hf_ms']:.0f} |",
            f"| ours | {v['pixdec_ours_ms']:.0f} |",
            *(
                [f"| ours with the reference `grid_sample` kernel | {v['pixdec_ours_grid_sample_ms']:.0f} |"]
                if "pixdec_ours_grid_sample_ms" in v
                else []
            ),
            f"| ratio ours / HF | {v['pixdec_time_ratio_vs_hf']:.3f} |",
            "",
        ]
    if "model_m2f" in v:
        lines += [
            f"## Encoders and whole models (R50, {bench.image_size[0]}x{bench.image_size[1]}, forward, batch 1)",
            "",
            f"Dense GEMM in this run: {v['dense_gemm_gmacs']:.1f} GMAC/s ({GEMM_SIZE_NOTE}; measured once"
            f" up front: {v.get('dense_gemm_gmacs_up_front', float('nan')):.1f}). GFLOPs = GMACs (fvcore conventions,"
            " `count_flops`, no post-processing); pixel decoder GMACs = `encoder` + `mask_projection`.",
            "",
            "| model | pixel decoder ms | ratio vs M2F | whole model ms | ratio vs M2F | pixel decoder GMACs |"
            " pixel decoder GMAC/s | fraction of dense GEMM |",
            "|---|---|---|---|---|---|---|---|",
        ]
        base = v["model_m2f"]
        for name in MODELS:
            e = v[f"model_{name}"]
            lines.append(
                f"| {name} | {e['pixdec_ms']:.0f} | {e['pixdec_ms'] / base['pixdec_ms']:.3f} | {e['model_ms']:.0f} |"
                f" {e['model_ms'] / base['model_ms']:.3f} | {fmt(e.get('pixdec_gflops', '-'), 1)} |"
                f" {fmt(e.get('pixdec_gmac_per_s', '-'), 1)} | {fmt(e.get('pixdec_gemm_fraction', '-'))} |"
            )
        if "proscale333_encoder_gflops_ratio" in v:
            lines += ["", f"PRO-SCALE (3,3,3)+LPE encoder GFLOPs / M2F's: {v['proscale333_encoder_gflops_ratio']:.3f}."]
        lines.append("")
    if "decoder_parts" in v:
        lines += parts_markdown(v["decoder_parts"])
    if "train_step" in v:
        t = v["train_step"]
        lines += [
            "## Training step, CPU preset of the main job",
            "",
            f"{t['preset']}: forward + loss + backward + grad clipping + AdamW on a synthetic batch of"
            f" {t['batch_size']} images at {t['image_size'][0]}x{t['image_size'][1]} (data loading excluded).",
            "",
            f"- step: {t['step_ms']:.0f} ms, **{t['images_per_s']:.1f} images/s**",
            f"- peak tensor memory of one step: {t['peak_mb']:.0f} MB",
            "",
        ]
    if "train_options" in v:
        from proscale.analysis.train_options import options_markdown

        t = v["train_options"]
        setting = (
            f"{t['preset']}: one training step (forward + loss + backward + clipping + AdamW) on a synthetic batch of"
            f" {t['batch_size']} images at {t['image_size'][0]}x{t['image_size'][1]}, each switch alone vs the default."
        )
        lines += options_markdown(t["rows"], "Compute and memory options (training step)", setting)
    if bench.errors:
        lines += ["## Sections that failed", ""] + [f"- {k}: `{e}`" for k, e in bench.errors.items()] + [""]
    lines += ["## Missed targets", ""]
    lines += [f"- `{k}`" for k in missed] if missed else ["None."]
    lines += ["", "See the notes below (kept by hand) for why targets were missed.", ""]
    return "\n".join(lines)


def parts_markdown(d: dict) -> list[str]:
    """The 'where the time goes' section (see :func:`bench_decoder_parts`)."""
    names = {"m2f": "M2F", "proscale333_lpe": "PRO-SCALE (3,3,3)+LPE"}
    lines = [
        "### Where the pixel decoders' time goes, and what the (3,3,3) ratio target needs",
        "",
        f"Each part timed on its own precomputed inputs, round-robin with a dense GEMM ({d['dense_gemm_gmacs']:.1f}"
        f" GMAC/s in this measurement); max |parts - whole| of the mask features = {d['max_abs_diff_parts_vs_whole']:.1e}.",
        "",
        "| part | " + " | ".join(f"{n} ms | GMACs | GMAC/s" for n in names.values()) + " |",
        "|---|" + "---|---|---|" * len(names),
    ]
    for part in PARTS:
        cells = []
        for name in names:
            p = d["parts"][name][part]
            cells.append(f"{p['ms']:.0f} | {p['gmacs']:.1f} | {p['gmacs'] / (p['ms'] / 1000):.1f}")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    totals = [sum(d["parts"][n][p]["ms"] for p in PARTS) for n in names]
    outside_encoder = [sum(d["parts"][n][p]["ms"] for p in PARTS if p != "encoder") for n in names]
    lines += [
        f"| sum | {totals[0]:.0f} | | | {totals[1]:.0f} | | |",
        "",
        f"Ratio of the sums: {totals[1] / totals[0]:.3f}. One full-resolution encoder layer (M2F encoder / 6):"
        f" {d['full_res_layer_ms']:.0f} ms for {d['full_res_layer_gmacs']:.2f} GMACs, of which"
        f" {d['full_res_layer_linear_gmacs']:.2f} in its linear layers; the (3,3,3) encoder's stage-1/2 layers take"
        f" {d['stage12_in_layers']:.2f} of those. Both encoders run the same layer code, so a faster layer speeds up"
        f" both; with the other parts as measured, the ratio would be {outside_encoder[1] / outside_encoder[0]:.3f} even with"
        f" instantaneous layers.",
    ]
    totals_ms = dict(zip(names, totals))
    budget = d["target"] * totals_ms["m2f"]
    over = totals_ms["proscale333_lpe"] - budget
    lines[-1] += f" At M2F's measured time the target allows the (3,3,3) decoder {budget:.0f} ms, " + (
        f"which is {over:.0f} ms less than it takes." if over > 0 else "which its parts meet."
    )
    if over <= 0 or math.isnan(d["needed_layer_ms"]):
        pass
    elif d["needed_layer_ms"] <= 0:
        lines[-1] += f" No layer speed reaches a time ratio of {d['target']}."
    else:
        lines[-1] += (
            f" Speeding up the layers alone reaches it at a full-resolution layer of **{d['needed_layer_ms']:.0f} ms**"
            f" ({d['needed_layer_gmac_per_s']:.0f} GMAC/s over the whole layer); its linear layers alone take"
            f" {d['linear_at_dense_gemm_ms']:.0f} ms at this run's dense-GEMM rate"
        )
        spare = d["needed_layer_ms"] - d["linear_at_dense_gemm_ms"]
        lines[-1] += (
            f", leaving {spare:.0f} ms for the deformable sampling, softmax, LayerNorms and residual adds of"
            f" {d['full_res_queries']:,} queries."
            if spare > 0
            else ", so that route is closed; only the parts PRO-SCALE alone has (its stage-1/2 layers and its"
            " stride-4 tail) can close the gap."
        )
    lines.append("")
    return lines


NOTES_MARKER = "<!-- notes: kept across runs -->"


def write_markdown(path: Path, text: str) -> None:
    """Write the generated report, keeping a hand-written notes section (after ``NOTES_MARKER``)."""
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER) :]
    atomic_write_text(path, text + "\n" + (notes or NOTES_MARKER + "\n"))
