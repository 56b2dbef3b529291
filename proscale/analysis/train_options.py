"""Training step time and peak memory of the compute / memory switches, each against the default.

Options (``OPTIONS``), each one config switch of a run:

- ``default``: fp32, eager, no checkpointing;
- ``checkpointing``: ``model.checkpointing=true`` (encoder + decoder layers recompute activations in backward);
- ``bf16``: ``trainer.precision=bf16-mixed`` (autocast bf16; the pixel decoder and its deformable sampling in fp32);
- ``fp16``: ``trainer.precision=16-mixed`` (CUDA only: autocast fp16 with a gradient scaler);
- ``compile``: ``model.compile=true`` (``torch.compile`` of backbone, encoder and decoder; the first, compiling,
  step is the warm-up and is not timed).

One step = forward + loss (:class:`~proscale.models.criterion.SetCriterion`) + backward + clipping + AdamW, on a
synthetic batch with 4 box-shaped targets per image. Used by ``scripts/benchmark.py --train-options`` and
``scripts/gpu_check.py``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from proscale.analysis.speed import peak_memory, time_fn

OPTIONS = ("default", "checkpointing", "bf16", "fp16", "compile")
MB = 1024**2


def synthetic_targets(batch: int, size: tuple[int, int], num_classes: int, device: torch.device, seed: int = 3):
    """``batch`` targets of 4 random boxes each: ``[{"labels": (4,), "masks": (4, H, W) bool}]``."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        masks = torch.zeros(4, *size, dtype=torch.bool)
        for mask in masks:
            y0, x0 = (int(torch.randint(0, s // 2, (1,), generator=gen)) for s in size)
            mask[y0 : y0 + size[0] // 3, x0 : x0 + size[1] // 3] = True
        labels = torch.randint(0, num_classes, (4,), generator=gen)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return targets


def make_train_step(
    build_model: Callable[..., torch.nn.Module],
    option: str,
    device: torch.device,
    batch: int,
    size: tuple[int, int],
    num_classes: int,
    num_points: int = 12544,
) -> tuple[Callable[[], float], torch.nn.Module]:
    """A closure running one training step of a model built with ``option``'s switch; it returns the loss."""
    from proscale.lightning.optim import build_adamw
    from proscale.models.criterion import SetCriterion

    if option not in OPTIONS:
        raise ValueError(f"unknown training option {option!r}; valid: {', '.join(OPTIONS)}")
    if option == "fp16" and device.type != "cuda":
        raise ValueError("the fp16 option (16-mixed) needs a CUDA device")
    switches: dict[str, Any] = {"checkpointing": option == "checkpointing", "compile": option == "compile"}
    torch.manual_seed(0)
    model = build_model(num_classes=num_classes, **switches).to(device).train()
    criterion = SetCriterion(num_classes, num_points=num_points).to(device)
    # unfused under AMP, as the training task makes it (proscale.lightning.distributed.module_config_for_precision)
    optimizer = build_adamw(model, fused=False if option in ("bf16", "fp16") else None)
    scaler = torch.amp.GradScaler("cuda") if option == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(option)
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)
    targets = synthetic_targets(batch, size, num_classes, device)

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = model(images)
        loss = criterion.total_loss(criterion(outputs, targets))  # the criterion computes in fp32
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return float(loss.detach())

    return step, model


def measure_train_options(
    build_model: Callable[..., torch.nn.Module],
    device: torch.device,
    batch: int,
    size: tuple[int, int],
    num_classes: int,
    options: Sequence[str] = ("default", "checkpointing", "bf16", "compile"),
    repeats: int = 3,
    num_points: int = 12544,
    clock: str = "wall",
) -> list[dict[str, Any]]:
    """One row per option: ``step_ms``, ``images_per_s``, ``peak_mb``, ``loss`` (finite?), ratios to ``default``,
    and ``error`` / ``warnings`` where the option failed or fell back."""
    rows: list[dict[str, Any]] = []
    for option in options:
        row: dict[str, Any] = {"option": option}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step, _ = make_train_step(build_model, option, device, batch, size, num_classes, num_points)
                timing = time_fn(step, warmup=1, repeats=repeats, device=device, batch_size=batch, clock=clock)
                row["peak_mb"] = peak_memory(step, device) / MB
                row["loss"] = step()
            row["step_ms"], row["images_per_s"] = timing.median_ms, timing.images_per_s
            row["loss_finite"] = math.isfinite(row["loss"])
            notes = sorted({str(w.message) for w in caught if "could not be compiled" in str(w.message)})
            if notes:
                row["warnings"] = notes
        except Exception as error:  # one option failing must not hide the others' numbers
            row["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        rows.append(row)
    base = next((r for r in rows if r["option"] == "default" and "error" not in r), None)
    for row in rows:
        if base is not None and "error" not in row:
            row["time_vs_default"] = row["step_ms"] / base["step_ms"]
            row["memory_vs_default"] = row["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
    return rows


def options_markdown(rows: list[dict[str, Any]], title: str, setting: str) -> list[str]:
    """The rows as a markdown section."""

    def num(value: Any, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"## {title}",
        "",
        setting,
        "",
        "| option | step ms | images/s | peak MB | time / default | memory / default | loss | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['option']} | - | - | - | - | - | - | failed: `{row['error']}` |")
            continue
        note = "; ".join(row.get("warnings", [])) or ("" if row.get("loss_finite") else "non-finite loss")
        lines.append(
            f"| {row['option']} | {row['step_ms']:.0f} | {row['images_per_s']:.2f} | {row['peak_mb']:.0f} | "
            f"{num(row.get('time_vs_default'), 2)} | {num(row.get('memory_vs_default'), 2)} | "
            f"{row['loss']:.3f} | {note} |"
        )
    return lines + [""]
