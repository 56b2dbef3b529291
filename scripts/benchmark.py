"""Measured speed of the deformable-attention op, the pixel decoders and the whole models.

    python scripts/benchmark.py [--device cpu|cuda] [--quick] [--json F] [--out benchmarks/RESULTS.md]

Everything is measured in ONE run, so the ratios compare numbers taken under the same conditions; each
time is the median of repeated runs after warm-up (``proscale.analysis.speed``). Sections:

1. op: our default deformable-attention kernel vs Hugging Face's ``multi_scale_deformable_attention`` at
   Mask2Former shapes for an 800x1088 input (batch 1, 8 heads x 32 ch, levels 100x136 / 50x68 / 25x34,
   4 points, 17,850 queries): forward, forward+backward, peak memory. Sampling locations are realistic:
   each query's reference point + Deformable-DETR's initial offset ring + N(0, 2 px) noise.
2. pixel decoder, R50 at 800x1088: ours (M2F encoder) vs HF's ``Mask2FormerPixelDecoder`` with identical
   weights (HF state dict converted by ``proscale.convert.hf_to_proscale``), on the same backbone features.
3. PRO-SCALE (1,1,1) and (3,3,3) with TRC + LPE vs our M2F, R50, 800x1088: pixel decoder and whole-model
   forward, their GFLOPs (``proscale.analysis.flops.count_flops``) and achieved GMAC/s next to a dense GEMM
   measured in the same run.
4. training step (forward + loss + backward + clipping + AdamW) of the CPU preset of the main job
   (``conf/experiment/cpu_synthetic.yaml``) on a synthetic batch: images/s and peak memory.
5. (``--train-options``, or ``--sections options``) the same training step with each compute / memory switch
   (``model.checkpointing``, bf16-mixed, ``model.compile``; fp16 on CUDA) vs the default: time and peak memory.
6. ``--deploy`` (instead of the sections above; ``proscale/analysis/deploy_bench.py``): ONNX Runtime CPU
   latency of M2F, PRO-SCALE (3,3,3)+LPE and (1,1,1)+LPE beside PyTorch eager and their GFLOPs, and where
   ONNX Runtime spends its time; writes ``--out`` (default ``benchmarks/DEPLOY.md``).

``--quick`` runs everything at reduced sizes and repeats (under a minute on an idle 2-core CPU); its
ratios are indicative only. A section that fails is reported (with its error) and the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import proscale.models.ops.ms_deform_attn_gather  # noqa: F401  (loads the ops package)
from proscale.analysis.benchmark_report import (
    MODELS,
    PARTS,
    PARTS_MODELS,
    TARGETS,
    markdown,
    write_markdown,
)
from proscale.analysis.speed import dense_gemm_gmacs, machine_info, peak_memory, time_fn
from proscale.utils.io import atomic_write_text

ops = sys.modules["proscale.models.ops.ms_deform_attn"]

MB = 1024**2
FULL_SIZE = (800, 1088)
QUICK_SIZE = (384, 512)



def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    """Shared settings of one run: device, sizes, repeats; collects values and section errors."""

    def __init__(self, device: str, quick: bool, clock: str = "wall") -> None:
        self.device = torch.device(device)
        self.clock = clock
        self.quick = quick
        self.image_size = QUICK_SIZE if quick else FULL_SIZE
        self.repeats = 2 if quick else 5
        self.values: dict[str, object] = {}
        self.errors: dict[str, str] = {}

    def time(self, fn: Callable[[], object], repeats: int | None = None, batch_size: int = 1) -> float:
        """Median ms of ``fn`` (one warm-up run)."""
        return time_fn(
            fn, warmup=1, repeats=repeats or self.repeats, device=self.device, batch_size=batch_size
        ).median_ms

    def time_interleaved(self, fns: dict[str, Callable[[], object]], repeats: int | None = None) -> dict[str, float]:
        """Median ms of each ``fn`` with their runs interleaved round-robin (one warm-up each), so a load
        that drifts during the measurement affects every compared candidate alike."""
        runs: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(repeats or self.repeats):
            for name, fn in fns.items():
                runs[name].append(time_fn(fn, warmup=0, repeats=1, device=self.device, clock=self.clock).median_ms)
        return {name: statistics.median(values) for name, values in runs.items()}

    def peak_mb(self, fn: Callable[[], object]) -> float:
        return peak_memory(fn, self.device) / MB

    def run_section(self, name: str, fn: Callable[[], None]) -> None:
        log(f"section {name} ...")
        started = time.perf_counter()
        try:
            fn()
        except Exception as err:  # a broken section must not hide the others' numbers
            self.errors[name] = f"{type(err).__name__}: {err}"
            log(f"section {name} FAILED: {self.errors[name]}")
            traceback.print_exc()
        log(f"section {name} done in {time.perf_counter() - started:.1f} s")


# --- 1. the op ------------------------------------------------------------------------------------------


def level_shapes(image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Token grids at strides 8, 16, 32 (coarse first) of a padded input."""
    h, w = image_size
    return [(math.ceil(h / s), math.ceil(w / s)) for s in (32, 16, 8)]


def op_inputs(image_size, device, heads=8, dim=32, points=4, seed=0):
    """Value, shapes, locations, weights as the M2F encoder produces them (queries = all tokens)."""
    from proscale.models.encoders.base import reference_points_for

    gen = torch.Generator().manual_seed(seed)
    shapes = level_shapes(image_size)  # coarse first, as the encoders order them
    levels, tokens = len(shapes), sum(h * w for h, w in shapes)
    ref = reference_points_for(shapes, 1, torch.device("cpu"), torch.float32)  # (1, S, L, 2)
    theta = torch.arange(heads) * (2 * math.pi / heads)
    ring = torch.stack([theta.cos(), theta.sin()], -1)
    ring = ring / ring.abs().max(-1, keepdim=True)[0]
    offsets = ring.view(heads, 1, 1, 2) * torch.arange(1, points + 1).view(1, 1, points, 1)
    offsets = offsets + 2.0 * torch.randn(1, tokens, heads, levels, points, 2, generator=gen)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(1, 1, 1, levels, 1, 2)
    locations = ref[:, :, None, :, None, :] + offsets / normalizer
    weights = torch.randn(1, tokens, heads, levels * points, generator=gen).softmax(-1)
    weights = weights.view(1, tokens, heads, levels, points)
    value = torch.randn(1, tokens, heads, dim, generator=gen)
    return value.to(device), shapes, locations.to(device), weights.to(device)


def bench_op(bench: Bench) -> None:
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention as hf_op

    value, shapes, locations, weights = op_inputs(bench.image_size, bench.device)
    bench.values["op_shapes"] = {"levels": shapes, "queries": locations.shape[1], "heads": 8, "head_dim": 32}
    ours = ops.get_default_impl()
    kernels = {
        "ours": lambda v, loc, w: ops.ms_deform_attn(v, shapes, loc, w, impl=ours),
        "hf": lambda v, loc, w: hf_op(v, shapes, loc, w),
    }
    with torch.no_grad():
        diff = (kernels["ours"](value, locations, weights) - kernels["hf"](value, locations, weights)).abs().max()
    bench.values["op_max_abs_diff_vs_hf"] = float(diff)
    grad_out = torch.randn(1, locations.shape[1], 256, device=bench.device)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    forwards, forward_backwards = {}, {}
    for name, kernel in kernels.items():

        def forward(kernel=kernel):
            with torch.no_grad():
                kernel(value, locations, weights)

        def forward_backward(kernel=kernel):
            kernel(*leaves).backward(grad_out)
            for leaf in leaves:
                leaf.grad = None

        forwards[name], forward_backwards[name] = forward, forward_backward
    for name, ms in bench.time_interleaved(forwards).items():
        bench.values[f"op_{name}_fwd_ms"] = ms
    for name, ms in bench.time_interleaved(forward_backwards).items():
        bench.values[f"op_{name}_fwdbwd_ms"] = ms
    for name in kernels:
        bench.values[f"op_{name}_fwd_peak_mb"] = bench.peak_mb(forwards[name])
        bench.values[f"op_{name}_fwdbwd_peak_mb"] = bench.peak_mb(forward_backwards[name])
        log(
            f"op {name}: fwd {bench.values[f'op_{name}_fwd_ms']:.0f} ms, fwd+bwd {bench.values[f'op_{name}_fwdbwd_ms']:.0f} ms"
        )
    v = bench.values
    v["op_fwd_speedup"] = v["op_hf_fwd_ms"] / v["op_ours_fwd_ms"]
    v["op_fwdbwd_speedup"] = v["op_hf_fwdbwd_ms"] / v["op_ours_fwdbwd_ms"]
    v["op_peak_mem_ratio"] = v["op_ours_fwdbwd_peak_mb"] / v["op_hf_fwdbwd_peak_mb"]
    v["op_fwd_peak_mem_ratio"] = v["op_ours_fwd_peak_mb"] / v["op_hf_fwd_peak_mb"]


# --- 2./3. pixel decoders and models ----------------------------------------------------------------------


def backbone_features(image_size, device, seed=1) -> dict[str, torch.Tensor]:
    """Random R50-shaped features (res2..res5, strides 4..32); the decoders normalize them (GroupNorm)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    chans = {"res2": (256, 4), "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    return {k: torch.randn(1, c, h // s, w // s, generator=gen).to(device) for k, (c, s) in chans.items()}


def realistic_deformable_weights(model: torch.nn.Module, seed: int = 2) -> None:
    """Trained-like sampling: non-zero offset/attention projections (the init makes every query sample the
    same ring, which is unrealistically cache-friendly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("sampling_offsets" in name or "attention_weights" in name) and name.endswith("weight"):
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def build_model(encoder: str, schedule=None, lpe=False, num_classes=133):
    from proscale.models import Mask2Former, build_backbone
    from proscale.models.encoders import ENCODERS

    kwargs = {"schedule": list(schedule), "trc": True} if encoder == "proscale" else {}
    model = Mask2Former(build_backbone("r50"), ENCODERS.build(encoder, **kwargs), num_classes=num_classes, lpe=lpe)
    realistic_deformable_weights(model)
    return model.eval()


def bench_pixdec_vs_hf(bench: Bench) -> None:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    from proscale.convert import hf_to_proscale, load_into

    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone_config = ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", out_features=stages
    )
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone_config, num_labels=133)).eval()
    realistic_deformable_weights(hf)
    ours = build_model("m2f")
    load_into(ours, hf_to_proscale(hf.state_dict()))
    hf_decoder = hf.model.pixel_level_module.decoder.to(bench.device)
    our_decoder = ours.pixel_decoder.to(bench.device)
    feats = backbone_features(bench.image_size, bench.device)
    feat_list = [feats[k] for k in ("res2", "res3", "res4", "res5")]
    with torch.no_grad():
        a = our_decoder(feats).mask_features
        b = hf_decoder(feat_list).mask_features
    bench.values["pixdec_max_abs_diff_vs_hf"] = float((a - b).abs().max())
    with torch.no_grad():
        times = bench.time_interleaved({"hf": lambda: hf_decoder(feat_list), "ours": lambda: our_decoder(feats)})
        bench.values["pixdec_hf_ms"], bench.values["pixdec_ours_ms"] = times["hf"], times["ours"]
        if not bench.quick:  # how much of the gain is the op: our decoder with the reference kernel
            ops.set_default_impl("grid_sample")
            try:
                bench.values["pixdec_ours_grid_sample_ms"] = bench.time(lambda: our_decoder(feats), repeats=3)
            finally:
                ops.set_default_impl("gather")
    bench.values["pixdec_time_ratio_vs_hf"] = bench.values["pixdec_ours_ms"] / bench.values["pixdec_hf_ms"]
    log(f"pixel decoder: ours {bench.values['pixdec_ours_ms']:.0f} ms, HF {bench.values['pixdec_hf_ms']:.0f} ms")


GEMM_KEY = "dense_gemm"


def bench_models(bench: Bench) -> None:
    try:
        from proscale.analysis.flops import count_flops
    except ImportError:  # pragma: no cover - the compute analysis is part of the project
        count_flops = None
    # the dense-GEMM reference: measured once up front, and again interleaved with the pixel decoders (below),
    # so that it sees the same machine speed as they do (this CPU's GEMM speed drifts by up to ~1.7x in an hour)
    size = 1024 if bench.quick else 2048
    bench.values["dense_gemm_gmacs_up_front"] = dense_gemm_gmacs(
        size=size, device=bench.device, repeats=bench.repeats, clock=bench.clock
    )
    gemm_a, gemm_b, gemm_out = (torch.randn(size, size, device=bench.device) for _ in range(3))
    feats = backbone_features(bench.image_size, bench.device)
    images = torch.randn(1, 3, *bench.image_size, device=bench.device)
    fractions = {}
    models = {name: build_model(**kwargs).to(bench.device) for name, kwargs in MODELS.items()}
    with torch.no_grad():
        candidates = {n: (lambda m=m: m.pixel_decoder(feats)) for n, m in models.items()}
        candidates[GEMM_KEY] = lambda: torch.mm(gemm_a, gemm_b, out=gemm_out)
        pixdec_ms = bench.time_interleaved(candidates)
        gemm = size**3 / (pixdec_ms.pop(GEMM_KEY) / 1000) / 1e9
        bench.values["dense_gemm_gmacs"] = gemm
        log(f"dense GEMM: {gemm:.1f} GMAC/s (up front: {bench.values['dense_gemm_gmacs_up_front']:.1f})")
        model_ms = bench.time_interleaved(
            {n: (lambda m=m: m(images)) for n, m in models.items()}, repeats=max(2, bench.repeats - 2)
        )
        bench_decoder_parts(bench, models, feats, candidates[GEMM_KEY], size)
    for name, model in models.items():
        entry = {"pixdec_ms": pixdec_ms[name], "model_ms": model_ms[name]}
        if count_flops is not None:
            flops = count_flops(model, image_size=bench.image_size, postprocess=False)
            pixdec_gmacs = flops["encoder"] + flops["mask_projection"]
            entry.update(
                pixdec_gflops=pixdec_gmacs,
                encoder_gflops=flops["encoder"],
                model_gflops=flops["total"],
                pixdec_gmac_per_s=pixdec_gmacs / (entry["pixdec_ms"] / 1000),
                model_gmac_per_s=flops["total"] / (entry["model_ms"] / 1000),
            )
            fractions[name] = entry["pixdec_gmac_per_s"] / gemm
            entry["pixdec_gemm_fraction"] = fractions[name]
        bench.values[f"model_{name}"] = entry
        log(f"{name}: pixel decoder {entry['pixdec_ms']:.0f} ms, model {entry['model_ms']:.0f} ms")
    del models
    v = bench.values
    v["proscale333_pixdec_time_ratio"] = v["model_proscale333_lpe"]["pixdec_ms"] / v["model_m2f"]["pixdec_ms"]
    v["proscale333_model_time_ratio"] = v["model_proscale333_lpe"]["model_ms"] / v["model_m2f"]["model_ms"]
    v["proscale111_pixdec_time_ratio"] = v["model_proscale111_lpe"]["pixdec_ms"] / v["model_m2f"]["pixdec_ms"]
    v["proscale111_model_time_ratio"] = v["model_proscale111_lpe"]["model_ms"] / v["model_m2f"]["model_ms"]
    if fractions:
        v["encoder_gemm_fraction"] = min(fractions.values())
        m2f, p333 = v["model_m2f"], v["model_proscale333_lpe"]
        v["proscale333_encoder_gflops_ratio"] = p333["encoder_gflops"] / m2f["encoder_gflops"]




def bench_decoder_parts(bench: Bench, models: dict, feats: dict, gemm: Callable[[], object], gemm_size: int) -> None:
    """Where the pixel decoders' time goes, and what the (3,3,3) time-ratio target would need.

    Times the three parts of the M2F and PRO-SCALE (3,3,3)+LPE pixel decoders -- input projections, encoder,
    stride-4 tail (adapter + upsample-add + 3x3 conv or LPE max-pool + GN + ReLU + mask projection) -- round-robin
    with a dense GEMM, each part on its own precomputed inputs, and counts each part's GMACs.

    Both encoders run the same layer code, so any speed-up of the layers applies to both. With L the time of
    one full-resolution layer (M2F encoder time / its layer count) and e = the (3,3,3) encoder's time beyond its
    3 full-resolution layers in units of L (its stage-1/2 layers), the time ratio at a layer time L is
    (proj_p + tail_p + (3 + e) L) / (proj_m + tail_m + 6 L), the other parts as measured. Solving for the ratio
    target gives the layer time L* the target needs, which the report sets against the time the layer's linear
    layers alone take at the dense-GEMM rate of this run.
    """
    from proscale.analysis.flop_counter import count_call_flops

    times_in = {}
    gmacs = {}
    checks = []
    for name in PARTS_MODELS:
        decoder = models[name].pixel_decoder
        fast = decoder._fast_path_applies(feats["res2"])
        projected = decoder.project_inputs(feats, fast)
        encoded = decoder.encoder(projected)
        masks = decoder.stride4_features(feats["res2"], encoded[-1], fast)
        checks.append(float((masks - decoder(feats).mask_features).abs().max()))
        times_in[f"{name}/input_proj"] = lambda d=decoder, f=fast: d.project_inputs(feats, f)
        times_in[f"{name}/encoder"] = lambda d=decoder, p=projected: d.encoder(p)
        times_in[f"{name}/stride4_tail"] = lambda d=decoder, e=encoded[-1], f=fast: d.stride4_features(
            feats["res2"], e, f
        )
        counted = count_call_flops(decoder, (feats,)).by_module
        projections = sum(counted[f"input_proj.{i}"] for i in range(len(decoder.input_proj)))  # a ModuleList
        layer = f"encoder.layers.{len(decoder.encoder.layers) - 1}"  # the last layer runs at full resolution
        linear = sum(
            counted[f"{layer}.{sub}"]
            for sub, module in decoder.encoder.layers[-1].named_modules()
            if isinstance(module, torch.nn.Linear)
        )
        gmacs[name] = {
            "input_proj": projections / 1e9,
            "encoder": counted["encoder"] / 1e9,
            "stride4_tail": (counted[""] - projections - counted["encoder"]) / 1e9,
            "full_res_layer": counted[layer] / 1e9,
            "full_res_layer_linear": linear / 1e9,
            "layers": len(decoder.encoder.layers),
            "last_stage_layers": int(getattr(decoder.encoder, "schedule", [len(decoder.encoder.layers)])[-1]),
        }
    times_in[GEMM_KEY] = gemm
    ms = bench.time_interleaved(times_in)
    gemm_rate = gemm_size**3 / (ms.pop(GEMM_KEY) / 1000) / 1e9
    parts = {
        name: {part: {"ms": ms[f"{name}/{part}"], "gmacs": gmacs[name][part]} for part in PARTS}
        for name in PARTS_MODELS
    }
    m2f, p333 = (parts[n] for n in PARTS_MODELS)
    layer_ms = m2f["encoder"]["ms"] / gmacs["m2f"]["layers"]
    full = gmacs["proscale333_lpe"]["last_stage_layers"]
    extra = (p333["encoder"]["ms"] - full * layer_ms) / layer_ms
    target = dict((k, t) for k, _, _, t in TARGETS)["proscale333_pixdec_time_ratio"]
    rest_m = m2f["input_proj"]["ms"] + m2f["stride4_tail"]["ms"]
    rest_p = p333["input_proj"]["ms"] + p333["stride4_tail"]["ms"]
    layers_m = gmacs["m2f"]["layers"]
    slope = (full + extra) - layers_m * target  # > 0 unless the (3,3,3) encoder were cheaper than half of M2F's
    needed = (target * rest_m - rest_p) / slope if slope > 0 else float("nan")
    layer_gmacs, linear_gmacs = gmacs["m2f"]["full_res_layer"], gmacs["m2f"]["full_res_layer_linear"]
    bench.values["decoder_parts"] = {
        "parts": parts,
        "max_abs_diff_parts_vs_whole": max(checks),
        "dense_gemm_gmacs": gemm_rate,
        "full_res_layer_ms": layer_ms,
        "full_res_layer_gmacs": layer_gmacs,
        "full_res_layer_linear_gmacs": linear_gmacs,
        "stage12_in_layers": extra,
        "target": target,
        "needed_layer_ms": needed,
        "full_res_queries": sum(feats[k].shape[-2] * feats[k].shape[-1] for k in ("res3", "res4", "res5")),
        "needed_layer_gmac_per_s": layer_gmacs / (needed / 1000) if needed > 0 else float("nan"),
        "linear_at_dense_gemm_ms": linear_gmacs / gemm_rate * 1000,
    }
    log(f"decoder parts: full-resolution layer {layer_ms:.0f} ms; the target needs {needed:.0f} ms")


# --- 4. training step of the CPU preset ---------------------------------------------------------------


def bench_train_step(bench: Bench) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from proscale.cli import CONFIG_DIR
    from proscale.models.criterion import SetCriterion

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=cpu_synthetic"])
    size = tuple(cfg.callbacks.compute_stats.image_size)
    batch = int(cfg.data.batch_size)
    num_classes = 10  # the synthetic dataset's 6 thing + 4 stuff classes
    torch.manual_seed(0)
    model = instantiate(cfg.model, num_classes=num_classes).to(bench.device).train()
    criterion = SetCriterion(num_classes, num_points=int(cfg.module.criterion.num_points)).to(bench.device)
    optimizer = instantiate(cfg.module.optimizer)(model)  # the run's AdamW (param groups, fused)
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, *size, generator=gen).to(bench.device)
    targets = []
    for _ in range(batch):  # 4 random boxes per image
        masks = torch.zeros(4, *size, dtype=torch.bool)
        for m in masks:
            y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=gen)) for s in size)
            m[y0 : y0 + size[0] // 3, x0 : x0 + size[1] // 3] = True
        labels = torch.randint(0, num_classes, (4,), generator=gen)
        targets.append({"labels": labels.to(bench.device), "masks": masks.to(bench.device)})

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion.total_loss(criterion(model(images), targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()

    timing = time_fn(step, warmup=2, repeats=bench.repeats, device=bench.device, batch_size=batch, clock=bench.clock)
    bench.values["train_step"] = {
        "preset": f"conf/experiment/cpu_synthetic.yaml (PRO-SCALE {tuple(cfg.model.encoder.schedule)}"
        f"{' + LPE' if cfg.model.lpe else ''}, {cfg.model.backbone.model_name}, d={cfg.model.conv_dim})",
        "batch_size": batch,
        "image_size": list(size),
        "step_ms": timing.median_ms,
        "images_per_s": timing.images_per_s,
        "peak_mb": bench.peak_mb(step),
    }
    log(f"train step: {timing.median_ms:.0f} ms for {batch} images ({timing.images_per_s:.1f} img/s)")


def bench_train_options(bench: Bench, options: list[str]) -> None:
    """Training step time and peak memory of each compute / memory switch vs the default
    (:mod:`proscale.analysis.train_options`): the cpu_synthetic preset's model and batch, or the tiny preset's
    with --quick."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from proscale.analysis.train_options import measure_train_options
    from proscale.cli import CONFIG_DIR

    preset = "tiny" if bench.quick else "cpu_synthetic"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={preset}"])
    size = (int(cfg.data.height), int(cfg.data.width))
    batch, points = int(cfg.data.batch_size), int(cfg.module.criterion.num_points)
    rows = measure_train_options(
        lambda **kw: instantiate(cfg.model, **kw), bench.device, batch, size, 10, options, bench.repeats, points
    )
    bench.values["train_options"] = {
        "preset": f"conf/experiment/{preset}.yaml",
        "batch_size": batch,
        "image_size": list(size),
        "rows": rows,
    }
    for row in rows:
        log(f"train option {row['option']}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "option"))


# --- report ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write the ratios and every measured value as JSON")
    parser.add_argument("--out", type=Path, help="write the markdown report here (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--quick", action="store_true", help="reduced sizes and repeats (under a minute)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall time (default), or process CPU time for --threads 1 runs on a CPU shared with other jobs",
    )
    parser.add_argument(
        "--sections", default="op,pixdec,models,train", help="comma list of: op, pixdec, models, train, options"
    )
    parser.add_argument(
        "--train-options",
        nargs="?",
        const="default,checkpointing,bf16,compile",
        help="add the training-options section: step time and peak memory of each of default, checkpointing, bf16, "
        "fp16 (CUDA), compile (comma list; no value = all but fp16); --sections options runs it alone",
    )
    parser.add_argument("--deploy", action="store_true", help="the deployment benchmark only (ONNX Runtime vs eager)")
    args = parser.parse_args(argv)
    if args.deploy:
        return main_deploy(args, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu is meaningful only with --device cpu --threads 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from proscale.utils.cpu_memory import ENV_VAR, retain_freed_memory

    # as the training / evaluation entry points do; PROSCALE_RETAIN_FREED_MEMORY=0 measures without it
    retained = retain_freed_memory()
    bench = Bench(args.device, args.quick, args.clock)
    info = machine_info(args.device)
    info["clock"] = args.clock
    info["cpu_memory_reuse"] = f"{retained} (proscale/utils/cpu_memory.py, {ENV_VAR})"
    options = (args.train_options or "default,checkpointing,bf16,compile").split(",")
    sections = {"op": bench_op, "pixdec": bench_pixdec_vs_hf, "models": bench_models, "train": bench_train_step}
    sections["options"] = lambda bench: bench_train_options(bench, options)
    names = args.sections.split(",")
    if args.train_options and "options" not in names:
        names.append("options")
    for name in names:
        if name not in sections:
            parser.error(f"unknown section {name!r}; valid: {', '.join(sections)}")
        bench.run_section(name, lambda name=name: sections[name](bench))
    try:
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "machine": info,
        "quick": bench.quick,
        "image_size": list(bench.image_size),
        "ratios": {key: bench.values.get(key) for key, *_ in TARGETS},
        "targets": {key: f"{op} {target}" for key, _, op, target in TARGETS},
        "values": bench.values,
        "errors": bench.errors,
    }
    result.update(result["ratios"])  # the keys at the top level too
    for key, _, _, _ in TARGETS:
        value = bench.values.get(key)
        log(f"{key} = {value if value is None else round(value, 3)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
    if args.out:
        write_markdown(args.out, markdown(bench, info, command.strip()))
        log(f"wrote {args.out}")
    return result


def main_deploy(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """``--deploy``: see ``proscale/analysis/deploy_bench.py`` (2 threads unless ``--threads``)."""
    from proscale.analysis.deploy_bench import markdown as deploy_markdown
    from proscale.analysis.deploy_bench import run_deploy_bench

    size = (256, 352) if args.quick else FULL_SIZE
    result = run_deploy_bench(
        build_model, size, threads=args.threads or 2, repeats=2 if args.quick else 5, profile_runs=1 if args.quick else 3,
        log=log,
    )  # fmt: skip
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or Path("benchmarks/DEPLOY.md")
    import onnxruntime

    info = machine_info("cpu")
    machine = (
        f"{info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}, onnxruntime {onnxruntime.__version__}, "
        f"load average at the end {info.get('load_average_1_5_15')}"
    )
    write_markdown(out, deploy_markdown(result, command.strip(), machine))
    log(f"wrote {out}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
