#!/usr/bin/env python
"""One command that exercises the CUDA paths and writes a markdown + JSON report (under 5 minutes on a GPU).

    python scripts/gpu_check.py                      # -> benchmarks/gpu_check.md + benchmarks/gpu_check.json
    python scripts/gpu_check.py --out DIR --quick    # smaller throughput runs

Checks, each reported with its numbers (a failing check is reported and the others still run):

1. parity: CUDA vs CPU forward in fp32 (TF32 off), M2F and PRO-SCALE (3,3,3)+LPE, R50, random weights: class
   and mask logits agree within 1e-4;
2. precision: 3 training steps with bf16-mixed and with 16-mixed (gradient scaler): every loss finite, and the
   deformable sampling in fp32 (the pixel decoder runs outside autocast);
3. DDP: one training step with NCCL on min(2, GPUs) processes of one node vs one process with the same global
   batch: the all-reduced gradients agree within 1e-4 (1 GPU: a 1-process NCCL group, which checks the path only);
4. throughput: training images/s (LSJ 1024x1024, batch 2) and inference ms/img (800x1088, batch 1) for M2F and
   PRO-SCALE (3,3,3)+LPE and (1,1,1)+LPE, R50 and Swin-T, with their GFLOPs (proscale/analysis/flops.py).

Without CUDA it says so, runs only the CPU part (GFLOPs of the throughput models and one tiny bf16 training step)
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# the one script that runs from a bare copy of the checkout (a lent GPU machine may have torch but not this
# package installed): the other scripts import the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proscale.utils.io import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARITY_TOL = 1e-4
DDP_TOL = 1e-4
MODELS = {  # name -> model overrides
    "M2F": ["model/encoder=m2f", "model.lpe=false"],
    "PRO-SCALE (3,3,3)+LPE": ["model/encoder=proscale", "model.encoder.schedule=[3,3,3]", "model.lpe=true"],
    "PRO-SCALE (1,1,1)+LPE": ["model/encoder=proscale", "model.encoder.schedule=[1,1,1]", "model.lpe=true"],
}
BACKBONES = {"R50": "model/backbone=r50", "Swin-T": "model/backbone=swin_t"}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_config(*overrides: str):
    from proscale.utils.hydra_utils import compose_config

    return compose_config("train", ["model.num_classes=133", *overrides]).model


def build(*overrides: str, **kwargs: Any) -> torch.nn.Module:
    import hydra

    return hydra.utils.instantiate(model_config(*overrides), **kwargs)


def tiny_builder(encoder: str = "proscale", freeze_bn: bool = False) -> Callable[..., torch.nn.Module]:
    from proscale.utils.hydra_utils import compose_config

    frozen = ["+model.backbone.freeze_bn=true"] if freeze_bn else []
    cfg = compose_config("train", ["experiment=tiny", f"model/encoder={encoder}", *frozen]).model

    def make(**kwargs: Any) -> torch.nn.Module:
        import hydra

        return hydra.utils.instantiate(cfg, **kwargs)

    return make


# --- checks ------------------------------------------------------------------------------------------------


def check_parity(report: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    images = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    rows = {}
    for name in ("M2F", "PRO-SCALE (3,3,3)+LPE"):
        torch.manual_seed(0)
        model = build(BACKBONES["R50"], *MODELS[name]).eval()
        with torch.no_grad():
            cpu = model(images)
            gpu = model.cuda()(images.cuda())
        diffs = {key: float((gpu[key].cpu() - cpu[key]).abs().max()) for key in ("pred_logits", "pred_masks")}
        rows[name] = {**diffs, "ok": all(d <= PARITY_TOL for d in diffs.values())}
        log(f"parity {name}: {diffs}")
    report["parity"] = {"tolerance": PARITY_TOL, "image_size": [256, 320], "models": rows}


def check_precision(report: dict, device: torch.device) -> None:
    import importlib

    from proscale.analysis.train_options import make_train_step

    ops = importlib.import_module("proscale.models.ops.ms_deform_attn")
    real_kernel, dtypes = ops.ms_deform_attn_gather_from_offsets, set()

    def recording(value, shapes, ref, offsets, weights):
        dtypes.add((str(value.dtype), str(offsets.dtype), str(weights.dtype)))
        return real_kernel(value, shapes, ref, offsets, weights)

    ops.ms_deform_attn_gather_from_offsets = recording
    rows = {}
    try:
        for option in ("bf16", "fp16") if device.type == "cuda" else ("bf16",):
            dtypes.clear()
            step, _ = make_train_step(tiny_builder(), option, device, 2, (64, 64), 10, num_points=256)
            losses = [step() for _ in range(3)]
            rows[option] = {
                "losses": losses,
                "finite": all(math.isfinite(v) for v in losses),
                "sampling_dtypes": sorted(dtypes),
                "sampling_fp32": dtypes == {("torch.float32",) * 3},
            }
            log(f"precision {option}: {rows[option]}")
    finally:
        ops.ms_deform_attn_gather_from_offsets = real_kernel
    report["precision"] = {"device": str(device), "model": "experiment=tiny (64x64, batch 2)", "steps": rows}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One NCCL rank: batch 1 (image ``rank`` of the global batch), one forward + loss + backward under DDP."""
    from proscale.analysis.train_options import synthetic_targets
    from proscale.models.criterion import SetCriterion
    from proscale.testing.callbacks import same_points_rand

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    torch.rand = same_points_rand  # the same sampled points in every process (see tests/test_ddp.py)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = tiny_builder("m2f", freeze_bn=True)(num_classes=10).to(device).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    images = torch.randn(world, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    targets = synthetic_targets(world, (64, 64), 10, device)
    criterion = SetCriterion(10, num_points=256, eos_coef=1.0).to(device)
    loss = criterion.total_loss(criterion(ddp(images[rank : rank + 1]), targets[rank : rank + 1]))
    loss.backward()
    if rank == 0:
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        torch.save(grads, out)
    torch.distributed.destroy_process_group()


def check_ddp(report: dict) -> None:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from proscale.analysis.train_options import synthetic_targets
    from proscale.models.criterion import SetCriterion
    from proscale.testing.callbacks import same_points_rand

    world = min(2, torch.cuda.device_count())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp_grads.pt")
        mp.start_processes(_ddp_worker, args=(world, port, out), nprocs=world, start_method="spawn")
        ddp_grads = torch.load(out, weights_only=True)
    real_rand, torch.rand = torch.rand, same_points_rand
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        model = tiny_builder("m2f", freeze_bn=True)(num_classes=10).to(device).train()
        images = torch.randn(world, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
        targets = synthetic_targets(world, (64, 64), 10, device)
        criterion = SetCriterion(10, num_points=256, eos_coef=1.0).to(device)
        with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
            criterion.total_loss(criterion(model(images), targets)).backward()
    finally:
        torch.rand = real_rand
    single = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    worst = max(float((ddp_grads[n] - g).abs().max()) for n, g in single.items())
    report["ddp"] = {
        "processes": world,
        "backend": "nccl",
        "max_grad_diff": worst,
        "tolerance": DDP_TOL,
        "ok": worst <= DDP_TOL and set(single) == set(ddp_grads),
        "note": "1 GPU: a 1-process NCCL group (checks the path, not the reduction)" if world == 1 else "",
    }
    log(f"ddp: {report['ddp']}")


def flops_table(report: dict) -> None:
    from proscale.analysis.flops import count_flops

    rows = {}
    for backbone, backbone_override in BACKBONES.items():
        for name, overrides in MODELS.items():
            model = build(backbone_override, *overrides)
            flops = count_flops(model, image_size=(800, 1088), orig_size=(480, 640))
            rows[f"{name}, {backbone}"] = {"encoder_gflops": flops["encoder"], "total_gflops": flops["total"]}
    report["gflops"] = {"image_size": [800, 1088], "models": rows}
    log(f"gflops: {len(rows)} models")


def _time_model(backbone_override, overrides, device, train_size, infer_size, repeats) -> dict[str, float]:
    """Training images/s (batch 2, fp32) and inference ms/img (batch 1, no grad) of one model."""
    from proscale.analysis.speed import time_fn
    from proscale.analysis.train_options import make_train_step

    def builder(**kwargs: Any) -> torch.nn.Module:
        return build(backbone_override, *overrides, **kwargs)

    step, model = make_train_step(builder, "default", device, 2, train_size, 133)
    train = time_fn(step, warmup=2, repeats=repeats, device=device, batch_size=2)
    model.eval()
    images = torch.randn(1, 3, *infer_size, device=device)
    with torch.no_grad():
        infer = time_fn(lambda: model(images), warmup=2, repeats=repeats, device=device)
    return {"train_images_per_s": train.images_per_s, "infer_ms_per_img": infer.median_ms}


def check_throughput(report: dict, quick: bool) -> None:
    device = torch.device("cuda")
    train_size, infer_size = ((512, 512), (400, 544)) if quick else ((1024, 1024), (800, 1088))
    repeats = 3 if quick else 10
    rows = {}
    for backbone, backbone_override in BACKBONES.items():
        for name, overrides in MODELS.items():
            key = f"{name}, {backbone}"
            row: dict[str, Any] = {}
            try:
                row.update(_time_model(backbone_override, overrides, device, train_size, infer_size, repeats))
                torch.cuda.empty_cache()  # the model of this row is gone: its memory goes back to the next one
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            row.update(report.get("gflops", {}).get("models", {}).get(key, {}))
            rows[key] = row
            log(f"throughput {key}: {row}")
    report["throughput"] = {"train_size": list(train_size), "infer_size": list(infer_size), "models": rows}


# --- report ------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = ["# GPU check (`scripts/gpu_check.py`)", "", f"Command: `{report['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()] + [""]
    if not report["cuda_available"]:
        lines += ["**No CUDA device on this machine**: only the CPU part ran (GFLOPs, one tiny bf16 step).", ""]
    if "parity" in report:
        p = report["parity"]
        lines += ["## CUDA vs CPU forward (fp32, TF32 off)", "", "| model | max diff logits | max diff masks | ok |"]
        lines += ["|---|---:|---:|---|"]
        lines += [
            f"| {n} | {r['pred_logits']:.2e} | {r['pred_masks']:.2e} | {'yes' if r['ok'] else '**no**'} |"
            for n, r in p["models"].items()
        ]
        lines += ["", f"Tolerance {p['tolerance']}.", ""]
    if "precision" in report:
        lines += ["## Mixed precision training steps", ""]
        for option, r in report["precision"]["steps"].items():
            lines.append(
                f"- {option} on {report['precision']['device']}: losses {[round(v, 4) for v in r['losses']]}, "
                f"finite: {r['finite']}, deformable sampling dtypes {r['sampling_dtypes']} (fp32: {r['sampling_fp32']})"
            )
        lines.append("")
    if "ddp" in report:
        d = report["ddp"]
        lines += ["## DDP (NCCL, one node)", ""]
        lines += [
            f"{d['processes']} process(es): max gradient difference vs one process {d['max_grad_diff']:.2e} "
            f"(tolerance {d['tolerance']}): {'ok' if d['ok'] else '**not ok**'}. {d['note']}",
            "",
        ]
    if "throughput" in report or "gflops" in report:
        t = report.get("throughput")
        models = (t or report["gflops"])["models"]
        header = "| model | total GFLOPs | encoder GFLOPs |"
        if t:
            header += f" train img/s ({t['train_size'][0]}x{t['train_size'][1]}, batch 2) |"
            header += f" inference ms/img ({t['infer_size'][0]}x{t['infer_size'][1]}) |"
        lines += ["## Throughput and GFLOPs (GFLOPs at 800x1088)", "", header, "|" + "---|" * (header.count("|") - 1)]
        for key, r in models.items():
            row = f"| {key} | {r.get('total_gflops', float('nan')):.1f} | {r.get('encoder_gflops', float('nan')):.1f} |"
            if t:
                row += f" {r.get('train_images_per_s', float('nan')):.2f} | {r.get('infer_ms_per_img', float('nan')):.1f} |"
            lines.append(row + (f" {r['error']}" if "error" in r else ""))
        lines.append("")
    if report["errors"]:
        lines += ["## Checks that failed", ""] + [f"- {k}: `{v}`" for k, v in report["errors"].items()] + [""]
    lines.append(f"Total time: {report['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="report folder (default: benchmarks/)")
    parser.add_argument("--quick", action="store_true", help="smaller throughput sizes and fewer repeats")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from proscale.analysis.speed import machine_info

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "command": "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cuda_available": cuda,
        "machine": machine_info("cuda" if cuda else "cpu"),
        "errors": {},
    }
    if not cuda:
        log("no CUDA device here: running the CPU part only (GFLOPs, a tiny bf16 training step)")
        checks = [("gflops", flops_table), ("precision", lambda r: check_precision(r, torch.device("cpu")))]
    else:
        checks = [
            ("parity", check_parity),
            ("precision", lambda r: check_precision(r, torch.device("cuda"))),
            ("ddp", check_ddp),
            ("gflops", flops_table),
            ("throughput", lambda r: check_throughput(r, args.quick)),
        ]
    for name, check in checks:
        try:
            check(report)
        except Exception as error:  # a failing check is reported; the others still run
            report["errors"][name] = f"{type(error).__name__}: {error}"
            log(f"{name} FAILED: {report['errors'][name]}")
            traceback.print_exc()
    report["wall_time_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(args.out / "gpu_check.md", markdown(report))
    log(f"wrote {args.out / 'gpu_check.md'} and gpu_check.json ({report['wall_time_s']:.0f} s)")
    return 0 if not cuda or not report["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
