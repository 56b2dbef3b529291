"""Measured speed of the deformable-attention op, the pixel decoders and the whole models (issue 6).

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import proscale.models.ops.ms_deform_attn_gather  # noqa: E402,F401  (loads the ops package)
from proscale.analysis.speed import dense_gemm_gmacs, machine_info, peak_memory, time_fn  # noqa: E402

ops = sys.modules["proscale.models.ops.ms_deform_attn"]

MB = 1024**2
FULL_SIZE = (800, 1088)
QUICK_SIZE = (384, 512)

# (key, description, comparison, target): the issue's targets, checked in the report
TARGETS = [
    ("op_fwd_speedup", "deformable-attention op forward, HF time / ours", ">=", 2.0),
    ("op_fwdbwd_speedup", "deformable-attention op forward+backward, HF time / ours", ">=", 1.5),
    ("op_peak_mem_ratio", "op peak memory (forward+backward), ours / HF", "<=", 1.0),
    ("pixdec_time_ratio_vs_hf", "M2F pixel decoder R50, ours / HF", "<=", 0.6),
    ("proscale333_pixdec_time_ratio", "PRO-SCALE (3,3,3)+LPE pixel decoder / our M2F's", "<=", 0.55),
    ("proscale333_model_time_ratio", "PRO-SCALE (3,3,3)+LPE whole model / our M2F's", "<=", 0.80),
    ("encoder_gemm_fraction", "lowest encoder GMAC/s / dense-GEMM GMAC/s", ">=", 0.60),
]


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
GEMM_SIZE_NOTE = "fp32 square matmul, timed round-robin with the pixel decoders below"
MODELS = {  # name -> build_model kwargs
    "m2f": {"encoder": "m2f"},
    "proscale111_lpe": {"encoder": "proscale", "schedule": (1, 1, 1), "lpe": True},
    "proscale333_lpe": {"encoder": "proscale", "schedule": (3, 3, 3), "lpe": True},
}


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


PARTS = ("input_proj", "encoder", "stride4_tail")
PARTS_MODELS = ("m2f", "proscale333_lpe")


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
        "preset": "conf/experiment/cpu_synthetic.yaml (PRO-SCALE (3,3,3) + LPE, "
        f"{cfg.model.backbone.model_name}, d={cfg.model.conv_dim})",
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


def markdown(bench: Bench, info: dict, command: str) -> str:
    v = bench.values
    rows, missed = target_rows(v)
    lines = [
        "# Benchmark results (issue 6)",
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
            f" batch 1, fp32. Ours = `{ops.get_default_impl()}` kernel; HF = transformers'"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text + "\n" + (notes or NOTES_MARKER + "\n"))
    os.replace(tmp, path)


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
    result.update(result["ratios"])  # the issue's keys at the top level too
    for key, _, _, _ in TARGETS:
        value = bench.values.get(key)
        log(f"{key} = {value if value is None else round(value, 3)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
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
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
