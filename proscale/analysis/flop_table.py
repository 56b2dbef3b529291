"""The compute table: every encoder x LPE x backbone, counted on meta-device models.

Models are composed from ``conf/train.yaml`` with Hydra overrides (``model/backbone=...``,
``model/encoder=...``, ``model.encoder.schedule=[...]``, ``model.lpe=...``, ``model.num_classes=...``) and
instantiated under ``torch.device("meta")``: no weights are allocated or initialised, so building and
counting all 36 models takes well under a minute.

Rows (one dict per model; GFLOPs per image at the COCO test-time protocol, params in millions):

    backbone, model, encoder, schedule ("3,3,3" or ""), lpe (bool),
    backbone_gflops, encoder_gflops, encoder_layers_gflops, decoder_gflops (mask projection + transformer
    decoder + anything else in the forward), postprocess_gflops, total_gflops,
    params_m, encoder_params_m, encoder_reduction_pct, total_reduction_pct   (vs M2F, same backbone, no LPE)

The paper's four headline numbers are computed from rows with the released settings (TRC on, LPE on for
PRO-SCALE; plain M2F as the reference), see :data:`PAPER_NUMBERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from proscale.analysis.flops import (
    COCO_IMAGE_SIZE,
    COCO_ORIG_SIZE,
    count_flops,
    count_flops_average,
    count_params,
    resize_for_test,
)

PAPER_BACKBONES = ("r50", "swin_t")  # the two backbones of the paper's compute tables
NUM_CLASSES = 133  # COCO panoptic


@dataclass(frozen=True)
class SizeProtocol:
    """Which image sizes the GFLOPs are counted at.

    Default: the COCO test-time protocol for one typical 480x640 image (input padded to 800x1088). With
    ``orig_sizes``, the mean over those original sizes, each resized and padded at test time.
    """

    image_size: tuple[int, int] | None = COCO_IMAGE_SIZE
    orig_size: tuple[int, int] = COCO_ORIG_SIZE
    orig_sizes: tuple[tuple[int, int], ...] | None = None

    def count(self, model: nn.Module) -> dict[str, float]:
        if self.orig_sizes:
            return count_flops_average(model, self.orig_sizes)
        return count_flops(model, self.image_size, self.orig_size)

    def describe(self) -> str:
        if self.orig_sizes:
            return f"mean over {len(self.orig_sizes)} images at COCO test-time size (short 800, long <= 1333)"
        image_size = self.image_size or resize_for_test(self.orig_size)[1]
        return f"input {image_size[0]}x{image_size[1]} (padded), post-processing at {self.orig_size[0]}x{self.orig_size[1]}"


COCO_PROTOCOL = SizeProtocol()


@dataclass(frozen=True)
class EncoderVariant:
    """One encoder setting of the table: short key (CLI), display label, registry name, PRO-SCALE schedule."""

    key: str
    label: str
    encoder: str
    schedule: tuple[int, ...] | None = None

    def overrides(self) -> list[str]:
        out = [f"model/encoder={self.encoder}"]
        if self.schedule is not None:
            out.append(f"model.encoder.schedule=[{','.join(str(p) for p in self.schedule)}]")
            out.append("model.encoder.trc=true")  # released setting
        return out


M2F = EncoderVariant("m2f", "M2F", "m2f")
VARIANTS: tuple[EncoderVariant, ...] = (
    M2F,
    EncoderVariant("rt_m2f", "RT-M2F", "rt_m2f"),
    EncoderVariant("lite_m2f", "Lite-M2F", "lite_m2f"),
    *(
        EncoderVariant(f"proscale_{''.join(map(str, s))}", f"PRO-SCALE ({','.join(map(str, s))})", "proscale", s)
        for s in ((1, 1, 1), (2, 2, 2), (3, 3, 3), (3, 1, 1), (1, 3, 1), (1, 1, 3))
    ),
)


def variants_by_key(keys: Iterable[str]) -> list[EncoderVariant]:
    """The table variants named by ``keys`` (e.g. ``["m2f", "proscale_111"]``), in table order."""
    known = {v.key: v for v in VARIANTS}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; valid keys: {list(known)}")
    wanted = set(keys)
    return [v for v in VARIANTS if v.key in wanted]


def model_overrides(backbone: str, variant: EncoderVariant, lpe: bool, num_classes: int = NUM_CLASSES) -> list[str]:
    """Hydra overrides selecting one model of the table."""
    return [
        f"model/backbone={backbone}",
        *variant.overrides(),
        f"model.lpe={'true' if lpe else 'false'}",
        f"model.num_classes={num_classes}",
    ]


def compose_model_config(overrides: Sequence[str], config_name: str = "train") -> Any:
    """``cfg.model`` of ``conf/<config_name>.yaml`` composed with Hydra's compose API and ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from proscale.cli import CONFIG_DIR

    if not Path(CONFIG_DIR).is_dir():
        raise ValueError(
            f"compute analysis: config directory {CONFIG_DIR} does not exist (set PROSCALE_CONFIG_DIR to the "
            "project's conf/ folder)"
        )
    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
        return compose(config_name=config_name, overrides=list(overrides)).model
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides)).model


def build_model(overrides: Sequence[str], device: str | torch.device = "meta") -> nn.Module:
    """Instantiate ``cfg.model`` for ``overrides``; on the meta device by default (no memory, no init cost)."""
    from hydra.utils import instantiate

    model_cfg = compose_model_config(overrides)
    if model_cfg.get("num_classes") is None:  # null = "the dataset's": no dataset here, so the paper's COCO count
        model_cfg.num_classes = NUM_CLASSES
    with torch.device(device):
        model = instantiate(model_cfg)
    if not isinstance(model, nn.Module):
        raise ValueError(f"compute analysis: cfg.model for {list(overrides)} built a {type(model).__name__}")
    return model


def model_row(model: nn.Module, sizes: SizeProtocol = COCO_PROTOCOL) -> dict[str, float]:
    """GFLOPs and parameters of one model (the numeric columns of a table row, reductions excluded)."""
    flops = sizes.count(model)
    params = count_params(model)
    return {
        "backbone_gflops": flops["backbone"],
        "encoder_gflops": flops["encoder"],
        "encoder_layers_gflops": flops["encoder_layers"],
        "decoder_gflops": flops["mask_projection"] + flops["transformer_decoder"] + flops["other"],
        "postprocess_gflops": flops["postprocess"],
        "total_gflops": flops["total"],
        "params_m": params["total"] / 1e6,
        "encoder_params_m": params["encoder"] / 1e6,
    }


def table_rows(
    backbones: Iterable[str] = PAPER_BACKBONES,
    variants: Iterable[EncoderVariant] = VARIANTS,
    lpe_settings: Iterable[bool] = (False, True),
    num_classes: int = NUM_CLASSES,
    sizes: SizeProtocol = COCO_PROTOCOL,
    extra_columns: Callable[[list[str]], dict[str, float]] | None = None,
    progress: Callable[[str], None] | None = None,
    combos: Iterable[tuple[EncoderVariant, bool]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (backbone, variant, LPE), with reductions vs M2F (same backbone, LPE off).

    ``combos`` replaces the full ``variants x lpe_settings`` product by explicit (variant, lpe) pairs.
    ``extra_columns(overrides)`` may add columns (e.g. measured milliseconds) to each row.
    """
    if combos is None:
        combos = [(variant, lpe) for variant in variants for lpe in lpe_settings]
    combos = list(combos)
    rows = []
    for backbone in backbones:
        counted: dict[tuple[str, bool], dict[str, float]] = {}
        for variant, lpe in [*combos, (M2F, False)]:
            if (variant.key, lpe) in counted:
                continue
            overrides = model_overrides(backbone, variant, lpe, num_classes)
            if progress is not None:
                progress(" ".join(overrides))
            counted[variant.key, lpe] = model_row(build_model(overrides), sizes)
        reference = counted[M2F.key, False]
        for variant, lpe in combos:
            row: dict[str, Any] = {
                "backbone": backbone,
                "model": variant.label,
                "encoder": variant.encoder,
                "schedule": ",".join(map(str, variant.schedule)) if variant.schedule else "",
                "lpe": lpe,
                **counted[variant.key, lpe],
            }
            row["encoder_reduction_pct"] = 100 * (1 - row["encoder_gflops"] / reference["encoder_gflops"])
            row["total_reduction_pct"] = 100 * (1 - row["total_gflops"] / reference["total_gflops"])
            if extra_columns is not None:
                row.update(extra_columns(model_overrides(backbone, variant, lpe, num_classes)))
            rows.append(row)
    return rows


@dataclass(frozen=True)
class PaperNumber:
    """A headline number of the paper and how to measure it from table rows."""

    name: str
    paper: float
    measure: Callable[[list[dict[str, Any]]], float]


def find_row(rows: list[dict[str, Any]], backbone: str, model: str, lpe: bool) -> dict[str, Any]:
    for row in rows:
        if row["backbone"] == backbone and row["model"] == model and row["lpe"] == lpe:
            return row
    raise ValueError(f"compute table has no row for backbone={backbone} model={model!r} lpe={lpe}")


def _encoder_share(backbone: str) -> Callable[[list[dict[str, Any]]], float]:
    def measure(rows: list[dict[str, Any]]) -> float:
        row = find_row(rows, backbone, M2F.label, False)
        return 100 * row["encoder_gflops"] / row["total_gflops"]

    return measure


def _encoder_reduction(backbone: str, model: str) -> Callable[[list[dict[str, Any]]], float]:
    def measure(rows: list[dict[str, Any]]) -> float:
        return find_row(rows, backbone, model, True)["encoder_reduction_pct"]

    return measure


PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    PaperNumber("M2F encoder share of total GFLOPs, R50 (%)", 54.04, _encoder_share("r50")),
    PaperNumber("M2F encoder share of total GFLOPs, Swin-T (%)", 50.38, _encoder_share("swin_t")),
    PaperNumber(
        "PRO-SCALE (1,1,1) encoder GFLOPs reduction vs M2F, R50 (%)",
        80.43,
        _encoder_reduction("r50", "PRO-SCALE (1,1,1)"),
    ),
    PaperNumber(
        "PRO-SCALE (3,3,3) encoder GFLOPs reduction vs M2F, R50 (%)",
        51.98,
        _encoder_reduction("r50", "PRO-SCALE (3,3,3)"),
    ),
)


def paper_number_rows(num_classes: int = NUM_CLASSES, sizes: SizeProtocol = COCO_PROTOCOL) -> list[dict[str, Any]]:
    """Only the rows the paper's numbers need (M2F R50 / Swin-T, PRO-SCALE (1,1,1) and (3,3,3) + LPE, R50)."""
    proscale_111, proscale_333 = variants_by_key(["proscale_111", "proscale_333"])
    rows = table_rows(["swin_t"], num_classes=num_classes, sizes=sizes, combos=[(M2F, False)])
    combos = [(M2F, False), (proscale_111, True), (proscale_333, True)]
    return rows + table_rows(["r50"], num_classes=num_classes, sizes=sizes, combos=combos)


def compare_paper_numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"name", "paper", "measured", "difference"}]`` (difference = measured - paper, in points)."""
    out = []
    for number in PAPER_NUMBERS:
        measured = float(number.measure(rows))
        out.append(
            {"name": number.name, "paper": number.paper, "measured": measured, "difference": measured - number.paper}
        )
    return out
