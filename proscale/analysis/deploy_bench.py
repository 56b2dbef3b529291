"""Deployment benchmark (``scripts/benchmark.py --deploy``): ONNX Runtime vs PyTorch eager on CPU.

For M2F, PRO-SCALE (3,3,3)+LPE and (1,1,1)+LPE (R50, 800x1088, batch 1, 2 threads by default), in one run:

- GFLOPs of the forward (:func:`proscale.analysis.flops.count_flops`, no post-processing);
- latency, measured round-robin (every candidate runs once per round, after one warm-up each) so a load
  drifting during the run affects all alike: PyTorch eager (default kernels and fast paths, ``no_grad``),
  ONNX Runtime on the fixed-size export with all graph optimisations, and with them disabled;
- where ONNX Runtime spends its time (its per-node profiler, a few profiled runs): the share of the
  deformable encoder, and of its ``GridSample`` (the sampling) and ``Gather*`` nodes, and what the
  optimiser did to the sampling nodes (op counts of the optimised graph vs the exported one).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from proscale.analysis.speed import time_fn

# (label, encoder, schedule, lpe): the models the issue compares
MODELS = [
    ("M2F", "m2f", None, False),
    ("PRO-SCALE (3,3,3)+LPE", "proscale", (3, 3, 3), True),
    ("PRO-SCALE (1,1,1)+LPE", "proscale", (1, 1, 1), True),
]
ENCODER_SCOPE = "pixel_decoder/encoder"  # ONNX node names carry the module path
SAMPLING_OPS = ("GridSample",)


def node_profile(trace_path: str | Path) -> list[dict]:
    """ONNX Runtime profile JSON -> [{"name", "op", "us"}] of the node kernels (summed over the runs)."""
    totals: Counter = Counter()
    ops: dict[str, str] = {}
    for event in json.loads(Path(trace_path).read_text()):
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        totals[name] += event.get("dur", 0)
        ops[name] = event.get("args", {}).get("op_name", "?")
    return [{"name": name, "op": ops[name], "us": us} for name, us in totals.items()]


def profile_shares(nodes: list[dict]) -> dict[str, float]:
    """Shares of the node time: the encoder's, its sampling (GridSample) and its Gather* nodes'."""
    total = sum(n["us"] for n in nodes) or 1
    encoder = [n for n in nodes if ENCODER_SCOPE in n["name"].replace(".", "/")]
    by_op = Counter()
    for node in encoder:
        by_op[node["op"]] += node["us"]
    sampling = sum(us for op, us in by_op.items() if op in SAMPLING_OPS)
    gather = sum(us for op, us in by_op.items() if op.startswith("Gather"))
    return {
        "encoder_share": sum(n["us"] for n in encoder) / total,
        "sampling_share": sampling / total,
        "gather_share": gather / total,
        "sampling_share_of_encoder": sampling / max(1, sum(by_op.values())),
        "top_encoder_ops": ", ".join(f"{op} {us / total:.1%}" for op, us in by_op.most_common(4)),
    }


def graph_ops(path: str | Path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each candidate, one warm-up each, then ``repeats`` rounds of one run per candidate."""
    for fn in fns.values():
        fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(time_fn(fn, warmup=0, repeats=1).median_ms)
    return {name: statistics.median(values) for name, values in runs.items()}


def run_deploy_bench(
    build_model: Callable[..., nn.Module],
    image_size: tuple[int, int],
    threads: int = 2,
    repeats: int = 5,
    profile_runs: int = 3,
    workdir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every model of :data:`MODELS`; ``build_model(encoder, schedule=..., lpe=...)`` builds one (eval).

    Returns {"rows": [per model: label, gflops, eager_ms, ort_ms, ort_noopt_ms, profile shares, op counts],
    "settings": {...}}.
    """
    from proscale.analysis.flops import count_flops
    from proscale.export import export_onnx
    from proscale.export.runtime import OnnxRuntimeModel

    torch.set_num_threads(threads)
    own_dir = tempfile.TemporaryDirectory(prefix="deploy-bench-") if workdir is None else None
    folder = Path(workdir or own_dir.name)
    folder.mkdir(parents=True, exist_ok=True)
    images = torch.randn(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    rows, candidates = [], {}
    for label, encoder, schedule, lpe in MODELS:
        model = build_model(encoder, schedule=schedule, lpe=lpe)
        gflops = count_flops(model, image_size, postprocess=False)["total"]
        path = folder / f"{encoder}{'_' + ''.join(map(str, schedule)) if schedule else ''}.onnx"
        started = time.perf_counter()
        export_onnx(model, path, image_size)
        log(f"{label}: {gflops:.1f} GFLOPs, exported in {time.perf_counter() - started:.0f} s")
        optimized = folder / f"{path.stem}.optimized.onnx"
        ort_all = OnnxRuntimeModel(path, num_threads=threads)
        ort_none = OnnxRuntimeModel(path, num_threads=threads, optimization="disabled")
        _write_optimized(path, optimized, threads)

        def eager(model=model):
            with torch.no_grad():
                model(images)

        candidates[f"{label}|eager"] = eager
        candidates[f"{label}|ort"] = lambda r=ort_all: r(images)
        candidates[f"{label}|ort_noopt"] = lambda r=ort_none: r(images)
        profiler = OnnxRuntimeModel(path, num_threads=threads, profile_prefix=str(folder / f"{path.stem}.profile"))
        for _ in range(profile_runs + 1):
            profiler(images)
        shares = profile_shares(node_profile(profiler.end_profiling()))
        exported_ops, optimized_ops = graph_ops(path), graph_ops(optimized)
        rows.append(
            {
                "label": label,
                "gflops": gflops,
                **shares,
                "exported_sampling_nodes": exported_ops["GridSample"],
                "optimized_sampling_nodes": optimized_ops["GridSample"],
                "exported_nodes": sum(exported_ops.values()),
                "optimized_nodes": sum(optimized_ops.values()),
                "fused_ops": ", ".join(f"{op} {n}" for op, n in optimized_ops.most_common() if op not in exported_ops)[
                    :200
                ],
            }
        )
    log(f"timing {len(candidates)} candidates round-robin, {repeats} rounds ...")
    times = round_robin(candidates, repeats)
    for row in rows:
        for kind in ("eager", "ort", "ort_noopt"):
            row[f"{kind}_ms"] = times[f"{row['label']}|{kind}"]
    if own_dir is not None:
        own_dir.cleanup()
    return {
        "rows": rows,
        "settings": {"image_size": list(image_size), "threads": threads, "repeats": repeats, "batch": 1},
    }


def _write_optimized(path: Path, optimized: Path, threads: int) -> None:
    """Let ONNX Runtime write the graph it runs after its (offline-serialisable) optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    options.intra_op_num_threads = threads
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def markdown(result: dict, command: str, machine: dict | None = None) -> str:
    """The DEPLOY.md report of :func:`run_deploy_bench`'s result."""
    s = result["settings"]
    lines = [
        "# Deployment benchmark: ONNX Runtime vs PyTorch eager (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Input {s['image_size'][0]}x{s['image_size'][1]}, batch {s['batch']}, {s['threads']} threads, R50, "
        f"median of {s['repeats']} round-robin rounds after one warm-up each.",
    ]
    if machine:
        lines.append(f"Machine: {machine}")
    lines += [
        "",
        "| model | GFLOPs | PyTorch eager ms | ORT ms | ORT / eager | ORT no graph opt. ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['gflops']:.1f} | {r['eager_ms']:.0f} | {r['ort_ms']:.0f} | "
            f"{r['ort_ms'] / r['eager_ms']:.2f} | {r['ort_noopt_ms']:.0f} |"
        )
    lines += [
        "",
        "Where ONNX Runtime spends its time (its node profiler; shares of the summed node kernel time):",
        "",
        "| model | encoder | sampling (GridSample) | Gather* in encoder | sampling / encoder | top encoder ops |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['encoder_share']:.1%} | {r['sampling_share']:.1%} | {r['gather_share']:.1%} | "
            f"{r['sampling_share_of_encoder']:.1%} | {r['top_encoder_ops']} |"
        )
    lines.append("")
    for r in result["rows"]:
        verdict = "dominates" if r["sampling_share_of_encoder"] > 0.5 else "does not dominate"
        lines.append(
            f"- {r['label']}: the deformable sampling {verdict} the encoder ({r['sampling_share_of_encoder']:.0%} of "
            f"its node time, {r['sampling_share']:.0%} of the whole graph's)."
        )
    lines += [
        "",
        "What the graph optimisations do (node counts of the exported vs the optimised graph, and the op types "
        "the optimiser introduced):",
        "",
        "| model | nodes exported -> optimised | GridSample nodes exported -> optimised | fused ops added |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['exported_nodes']} -> {r['optimized_nodes']} | "
            f"{r['exported_sampling_nodes']} -> {r['optimized_sampling_nodes']} | {r['fused_ops'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["MODELS", "markdown", "node_profile", "profile_shares", "run_deploy_bench"]
