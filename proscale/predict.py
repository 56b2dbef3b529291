"""The prediction task: a folder of images -> panoptic overlays (PNG) + COCO panoptic PNG/JSON.

The checkpoint alone defines the model: the training task stores the model's config and the dataset's class
metadata in it (``hyper_parameters.model_config`` / ``.meta``), so no dataset is needed here.

Output folder (``cfg.output_dir``, default ``<run dir>/predictions``)::

    overlays/<stem>.png          image with coloured segments and boundaries
    panoptic_pred/<stem>.png     segment ids RGB-encoded (COCO panoptic format)
    panoptic_pred.json           {"annotations": [...segments_info...], "categories": [...]}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from proscale.data.collate import normalize_image, padded_size
from proscale.data.image_io import read_rgb_image
from proscale.data.transforms import ResizeShortestEdge
from proscale.metrics.export import PanopticExporter, write_png_atomic
from proscale.models.inference import Mask2FormerInference
from proscale.structures import DatasetMeta
from proscale.utils.checkpoints import load_checkpoint_cpu, resolve_ckpt_path
from proscale.utils.logging_utils import get_logger
from proscale.utils.task import task_wrapper
from proscale.utils.visualize import panoptic_overlay

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_model_from_checkpoint(path: str, device: torch.device) -> tuple[torch.nn.Module, DatasetMeta]:
    """Rebuild the trained model from the config stored in a training checkpoint and load its weights."""
    checkpoint = load_checkpoint_cpu(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not hparams.get("model_config") or not hparams.get("meta"):
        raise ValueError(f"{path} has no stored model config / class metadata; it was not written by scripts/train.py")
    meta = DatasetMeta(**hparams["meta"])
    model = hydra.utils.instantiate(hparams["model_config"])
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit the stored model config; missing {result.missing_keys[:15]}, "
            f"unexpected {result.unexpected_keys[:15]}"
        )
    return model.to(device).eval(), meta


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"input_dir={folder}: no such folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"input_dir={folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def prepare_image(rgb, short_side: int, max_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(h0, w0, 3) uint8 -> normalized (1, 3, H, W) padded to a multiple of 32, and the resized valid size."""
    h0, w0 = rgb.shape[:2]
    size = ResizeShortestEdge.output_size(h0, w0, short_side, max_size)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]
    if size != (h0, w0):
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    image = normalize_image(image[0])
    padded = padded_size([size])
    return F.pad(image, (0, padded[1] - size[1], 0, padded[0] - size[0]))[None], size


@task_wrapper
def predict(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the checkpoint on every image of ``cfg.input_dir``; returns ({"images", "seconds"}, {"output_dir"})."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    if cfg.device not in ("auto", None):
        device = torch.device(cfg.device)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.runs_dir)
    model, meta = load_model_from_checkpoint(ckpt_path, device)
    inference = Mask2FormerInference(
        meta.num_classes,
        meta.thing_classes,
        object_mask_threshold=cfg.object_mask_threshold,
        overlap_threshold=cfg.overlap_threshold,
        instance_on=False,
        semantic_on=False,
    ).to(device)
    out_dir = Path(cfg.output_dir or Path(cfg.paths.output_dir) / "predictions")
    exporter = PanopticExporter(out_dir, meta)
    images = list_images(cfg.input_dir)
    start = time.perf_counter()
    with torch.no_grad():
        for image_id, path in enumerate(images):
            rgb = read_rgb_image(path)
            batch, size = prepare_image(rgb, cfg.short_side, cfg.max_size)
            outputs = model(batch.to(device))
            prediction = inference(outputs, [size], [rgb.shape[:2]])[0]
            exporter.add(image_id, path.name, prediction)
            segment_ids, segments = prediction["panoptic_seg"]
            overlay = panoptic_overlay(rgb, segment_ids.cpu().numpy(), segments, meta.colors, alpha=cfg.alpha)
            write_png_atomic(out_dir / "overlays" / f"{path.stem}.png", overlay)
            log.info(f"{path.name}: {len(segments)} segments")
    json_path = exporter.finalize()
    seconds = time.perf_counter() - start
    print(f"{len(images)} images -> {out_dir} (overlays/, panoptic_pred/, {Path(json_path).name}) in {seconds:.1f} s")
    return {"images": len(images), "seconds": seconds}, {"output_dir": out_dir, "json": json_path}
