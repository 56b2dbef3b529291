"""The prediction task: images -> COCO panoptic / instance results, semantic maps and labelled overlays.

Everything comes from the weights (:func:`load_predictor`): the model, the class metadata, the inference
settings the run was scored with and its test-time transform, so ``scripts/score_coco.py`` on the output of a
split scores what ``scripts/eval.py`` reports for it. Command-line values win (printed): ``model.*``,
``object_mask_threshold`` / ``overlap_threshold`` / ``topk_per_image``, ``test_transforms`` or ``short_side``.

Output folder (``output_dir``, default ``<run dir>/predictions``)::

    panoptic.json            COCO panoptic results: {"annotations": [{image_id, file_name, segments_info}],
                             "categories": [...], "images": [{id, file_name, height, width}]}
    panoptic/<stem>.png      segment ids RGB-encoded (id = R + 256 G + 256^2 B, 0 = void)
    instances.json           COCO instance results: [{image_id, category_id, segmentation (RLE), score}]
    semantic/<stem>.png      contiguous class index per pixel (the order of panoptic.json's categories)
    overlays/<stem>.png      the image with segments, class names + scores, and a legend
    summary.json             images done / failed (with the error), the settings used

A bad image (unreadable, truncated, a size the transform or model cannot take) is reported, skipped and listed
in ``summary.json``; the JSON files hold every good image and are written atomically, also when the run is
interrupted. ``scripts/predict.py`` exits with :data:`EXIT_SOME_FAILED` when some images failed.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from proscale.data.categories import builtin_meta, meta_from_categories
from proscale.data.collate import collate_batch
from proscale.data.common import make_item
from proscale.data.image_io import read_rgb_image
from proscale.data.transforms import Compose, Sample
from proscale.metrics.export import coco_categories, panoptic_to_coco
from proscale.metrics.instance import instance_results
from proscale.models.inference import Mask2FormerInference
from proscale.structures import DatasetMeta
from proscale.tasks.stored_run import (
    build_test_transform,
    merged_settings,
    read_weights_of,
    skip_backbone_pretraining_weights,
    stored_meta,
)
from proscale.utils.io import atomic_write_json, atomic_write_png, read_json
from proscale.utils.logging_utils import get_logger
from proscale.utils.task import task_wrapper
from proscale.utils.visualize import labelled_overlay
from proscale.weights import command_line_model_overrides, load_weights_into, resolve_model_config

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EXIT_SOME_FAILED = 3
# Inference settings that may be given at the root of predict.yaml (null = the stored value).
INFERENCE_OVERRIDES = ("object_mask_threshold", "overlap_threshold", "topk_per_image")


@dataclass
class Predictor:
    """What prediction needs, all taken from the weights.

    ``model(images)``: images (B, 3, H, W) float32, normalised with ``PIXEL_MEAN`` / ``PIXEL_STD`` and zero-padded
    to multiples of 32 -> ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4)}`` (other keys ignored).
    Any callable with that contract can replace the torch model (e.g. an exported one).
    """

    model: Callable[[Tensor], dict]
    meta: DatasetMeta
    inference: dict[str, Any]  # Mask2FormerInference keyword arguments other than num_classes / thing_classes
    test_transform: Compose
    test_transform_configs: list
    source: str


def load_predictor(cfg: DictConfig, device: torch.device) -> Predictor:
    """Model, class metadata, inference settings and test-time transform from ``cfg.weights`` (or ``ckpt_path``),
    with the command line's overrides applied (printed). ``cfg`` holds predict.yaml's keys; outside the app
    ``OmegaConf.create({"weights": path})`` is enough."""
    if cfg.get("onnx"):
        return load_onnx_predictor(cfg)
    loaded = read_weights_of(cfg)
    explicit = command_line_model_overrides()
    model_cfg = resolve_model_config(cfg.get("model") or OmegaConf.create({}), loaded, explicit)
    skip_backbone_pretraining_weights(model_cfg, explicit)
    model = hydra.utils.instantiate(model_cfg)
    meta = class_metadata(cfg.get("classes"), stored_meta(loaded), int(model.num_classes), loaded.path)
    load_weights_into(model, loaded, allow_partial=bool(cfg.get("weights_allow_partial", False)))
    given = {k: cfg.get(k) for k in INFERENCE_OVERRIDES if cfg.get(k) is not None}
    inference = merged_settings("inference", loaded.inference, given, given)
    configs = chosen_test_transforms(cfg, loaded.test_transforms, loaded.path)
    return Predictor(
        model=model.to(device).eval(),
        meta=meta,
        inference=inference,
        test_transform=build_test_transform(configs),
        test_transform_configs=configs,
        source=str(loaded.path),
    )


KNOWN_CLASS_COUNTS = {133: "coco_panoptic", 150: "ade20k", 19: "cityscapes", 80: "coco_instance"}


def class_metadata(classes: str | None, stored: DatasetMeta | None, num_classes: int, source: Path) -> DatasetMeta:
    """The class names / ids / thing flags that label the output.

    ``classes`` (predict.yaml) wins: a built-in dataset (``coco_panoptic``, ``ade20k``, ``cityscapes``,
    ``coco_instance``) or a COCO JSON with ``categories``. Else the classes the weights store (this project's
    checkpoints). A foreign file (detectron2, official PRO-SCALE, Hugging Face) stores none: a class count of a
    built-in dataset takes its classes (printed, as detectron2's model zoo does), any other count gets numbered
    names with a warning. The chosen classes must match the model's class head.
    """
    if classes:
        if Path(str(classes)).is_file():
            data = read_json(Path(str(classes)), "classes file")
            categories = data.get("categories") if isinstance(data, dict) else None
            meta = meta_from_categories(categories or [], str(classes))
        else:
            meta = builtin_meta(str(classes))
        print(f"classes: {classes} (command line)")
    elif stored is not None:
        return stored
    elif num_classes in KNOWN_CLASS_COUNTS:
        name = KNOWN_CLASS_COUNTS[num_classes]
        print(
            f"classes: {source} stores no class names; its {num_classes}-class head is read as {name} (classes=... to choose)"
        )
        meta = builtin_meta(name)
    else:
        log.warning(
            f"{source} stores no class names and {num_classes} classes match no built-in dataset: segments are labelled "
            "'class 0', 'class 1', ... (all as things); pass classes=<COCO JSON with categories> to name them"
        )
        return DatasetMeta(
            [f"class {i}" for i in range(num_classes)], list(range(1, num_classes + 1)), [True] * num_classes
        )
    if meta.num_classes != num_classes:
        raise ValueError(
            f"classes={classes or name}: {meta.num_classes} classes, but the model of {source} has {num_classes}"
        )
    return meta


def load_onnx_predictor(cfg: DictConfig) -> Predictor:
    """The same as :func:`load_predictor` for an exported file (``onnx=FILE.onnx``, ``scripts/export.py``): ONNX
    Runtime runs the network, the file's metadata gives the classes, inference settings and test transforms, and
    the post-processing is this project's own, so a deployed model predicts as the PyTorch one."""
    if cfg.get("weights") or cfg.get("ckpt_path"):
        raise ValueError("pass either onnx=FILE or weights=/ckpt_path=, not both")
    from proscale.export.runtime import OnnxRuntimeModel

    runtime = OnnxRuntimeModel(str(cfg.onnx), num_threads=cfg.get("num_threads") or torch.get_num_threads())
    metadata = runtime.metadata
    meta = metadata.dataset_meta()
    if meta is None:
        raise ValueError(f"{cfg.onnx} stores no class metadata (names, ids): predict cannot label its output")
    given = {k: cfg.get(k) for k in INFERENCE_OVERRIDES if cfg.get(k) is not None}
    inference = merged_settings("inference", metadata.inference, given, given)
    configs = chosen_test_transforms(cfg, metadata.test_transforms, Path(str(cfg.onnx)))
    model = runtime if metadata.dynamic else FixedSizeInput(runtime, tuple(metadata.image_size))
    size = "dynamic size" if metadata.dynamic else "fixed size {}x{}".format(*metadata.image_size)
    print(f"onnx: {cfg.onnx} ({size})")
    return Predictor(
        model=model,
        meta=meta,
        inference=inference,
        test_transform=build_test_transform(configs),
        test_transform_configs=configs,
        source=str(cfg.onnx),
    )


class FixedSizeInput:
    """Runs a fixed-size exported model on smaller padded batches: zero-pads the images (B, 3, H, W) on the right
    and bottom to the export size (as the collate pads) and crops the mask logits back to (H/4, W/4). A batch
    larger than the export size is refused by the runtime with both sizes named."""

    def __init__(self, model: Callable[[Tensor], dict], size: tuple[int, int]) -> None:
        self.model, self.size = model, size

    def __call__(self, images: Tensor) -> dict:
        h, w = images.shape[-2:]
        if h <= self.size[0] and w <= self.size[1]:
            images = F.pad(images, (0, self.size[1] - w, 0, self.size[0] - h))
        outputs = self.model(images)
        return {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"][..., : h // 4, : w // 4]}


def chosen_test_transforms(cfg: DictConfig, stored: list | None, path: Path) -> list:
    """``cfg.test_transforms`` or ``cfg.short_side`` when given (printed), else the stored transform configs."""
    if cfg.get("test_transforms") is not None:
        configs = OmegaConf.to_container(cfg.test_transforms, resolve=True)
        print(f"test_transforms: {configs} (command line; the weights store {stored})")
    elif cfg.get("short_side") is not None:
        configs = [
            {
                "_target_": "proscale.data.transforms.ResizeShortestEdge",
                "short_edge": int(cfg.short_side),
                "max_size": int(cfg.get("max_size") or 1333),
            }
        ]
        print(f"test_transforms: {configs} (short_side from the command line; the weights store {stored})")
    else:
        if stored is None:
            log.warning(f"{path} stores no test-time transforms: images are predicted at their own size")
        configs = list(stored or [])
    return configs


def run_model(model: Callable[[Tensor], dict], images: Tensor) -> dict:
    """The one place the model is called (see :class:`Predictor`)."""
    outputs = model(images)
    return {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}


# ------------------------------------------------------------------------------------------------ inputs
def list_inputs(spec: str) -> list[Path]:
    """An image file, a folder (its images, sorted) or a glob pattern (``**`` recursive) -> image paths."""
    path = Path(spec)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"input={spec}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
    elif path.is_file():
        images = [path]
    else:
        if not glob.has_magic(spec):
            raise ValueError(f"input={spec}: no such file or folder")
        images = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        images = [p for p in images if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise ValueError(f"input={spec}: the pattern matches no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise ValueError(
                f"input={spec}: {stems[image.stem]} and {image} would write the same output files ({image.stem}.png)"
            )
        stems[image.stem] = image
    return images


def image_ids(images: list[Path], gt_json: str | None) -> list[int]:
    """The ids of ``gt_json``'s ``images`` matched by file name (then by stem), else 1, 2, ... in order."""
    if not gt_json:
        return list(range(1, len(images) + 1))
    data = read_json(gt_json, "gt_json")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"gt_json={gt_json} has no 'images' list")
    by_name = {Path(str(e.get("file_name"))).name: e.get("id") for e in entries if isinstance(e, dict)}
    by_stem = {Path(name).stem: image_id for name, image_id in by_name.items()}
    ids, unknown = [], []
    for image in images:
        image_id = by_name.get(image.name, by_stem.get(image.stem))
        if image_id is None:
            unknown.append(image.name)
        ids.append(image_id)
    if unknown:
        raise ValueError(f"gt_json={gt_json} lists no image named {unknown[:5]} ({len(unknown)} of {len(images)})")
    return ids


# ------------------------------------------------------------------------------------------------ outputs
class PredictionWriter:
    """Writes each image's PNGs as it comes and the JSON files of all images written so far at ``finish``."""

    def __init__(self, out_dir: Path, meta: DatasetMeta, alpha: float) -> None:
        self.out_dir, self.meta, self.alpha = out_dir, meta, alpha
        self.panoptic: list[dict] = []
        self.instances: list[dict] = []
        self.images: list[dict] = []
        self.failed: list[dict] = []

    def add(self, image_id: int, path: Path, rgb: np.ndarray, prediction: dict) -> int:
        """Everything of one image is computed first, then written: a failure writes nothing of it to the JSON."""
        png_name = path.stem + ".png"
        panoptic_rgb, annotation = panoptic_to_coco(prediction["panoptic_seg"], self.meta, image_id, png_name)
        instances = instance_results(prediction["instances"], self.meta, image_id) if "instances" in prediction else []
        segment_ids, segments = prediction["panoptic_seg"]
        overlay = labelled_overlay(
            rgb, segment_ids.cpu().numpy(), segments, self.meta.class_names, self.meta.colors, alpha=self.alpha
        )
        atomic_write_png(self.out_dir / "panoptic" / png_name, panoptic_rgb)
        if "sem_seg" in prediction:
            classes = prediction["sem_seg"].argmax(0).cpu().numpy()
            dtype = np.uint8 if self.meta.num_classes <= 256 else np.uint16
            atomic_write_png(self.out_dir / "semantic" / png_name, classes.astype(dtype))
        atomic_write_png(self.out_dir / "overlays" / png_name, overlay)
        self.panoptic.append(annotation)
        self.instances.extend(instances)
        self.images.append({"id": image_id, "file_name": path.name, "height": rgb.shape[0], "width": rgb.shape[1]})
        return len(annotation["segments_info"])

    def fail(self, path: Path, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        log.error(f"{path}: skipped ({message})")
        self.failed.append({"file": str(path), "error": message})

    def finish(self, summary: dict[str, Any]) -> None:
        order = {image["id"]: index for index, image in enumerate(self.images)}
        atomic_write_json(
            self.out_dir / "panoptic.json",
            {
                "annotations": sorted(self.panoptic, key=lambda a: order[a["image_id"]]),
                "categories": coco_categories(self.meta),
                "images": self.images,
            },
            compact=True,
        )
        atomic_write_json(self.out_dir / "instances.json", self.instances, compact=True)
        atomic_write_json(self.out_dir / "summary.json", {**summary, "failed": self.failed})


# ------------------------------------------------------------------------------------------------ the task
def prepare(path: Path, image_id: int, transform: Compose) -> tuple[np.ndarray, dict]:
    """Read + transform one image into a dataset item (the items eval's data loader builds, without targets)."""
    rgb = read_rgb_image(path)
    sample = transform(Sample(image=rgb.copy()))
    h, w = sample.size
    if h < 1 or w < 1:
        raise ValueError(f"{path}: the test-time transform turns its {rgb.shape[0]}x{rgb.shape[1]} pixels into {h}x{w}")
    return rgb, make_item(sample, [], [], image_id=image_id, file_name=path.name, orig_size=rgb.shape[:2], gt=None)


def predict_batch(predictor: Predictor, inference: Mask2FormerInference, items: list, device: torch.device) -> list:
    batch = collate_batch([item for _, _, _, item in items])
    outputs = run_model(predictor.model, batch["images"].to(device))
    return inference(outputs, batch["image_sizes"], batch["orig_sizes"])


@task_wrapper
def predict(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Predict every image of ``cfg.input``; returns ({"images", "failed", "seconds"}, {"output_dir", ...})."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    if cfg.device not in ("auto", None):
        device = torch.device(cfg.device)
    spec = cfg.get("input") or cfg.get("input_dir")
    if not spec:
        raise ValueError("predict needs input=PATH (an image, a folder or a glob pattern such as 'photos/*.jpg')")
    images = list_inputs(str(spec))
    ids = image_ids(images, cfg.get("gt_json"))
    predictor = load_predictor(cfg, device)
    meta = predictor.meta
    inference = Mask2FormerInference(meta.num_classes, meta.thing_classes, **predictor.inference).to(device)
    print(f"inference settings: {predictor.inference}; test transforms: {predictor.test_transform_configs}")
    out_dir = Path(cfg.output_dir or Path(cfg.paths.output_dir) / "predictions")
    writer = PredictionWriter(out_dir, meta, float(cfg.alpha))
    batch_size = max(1, int(cfg.get("batch_size") or 1))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for first in range(0, len(images), batch_size):
                items = []
                for path, image_id in zip(images[first : first + batch_size], ids[first : first + batch_size]):
                    try:
                        items.append((path, image_id, *prepare(path, image_id, predictor.test_transform)))
                    except Exception as error:  # one bad image must not stop the others
                        writer.fail(path, error)
                _predict_group(predictor, inference, writer, items, device)
    finally:
        seconds = time.perf_counter() - start
        summary = {
            "weights": predictor.source,
            "inference": predictor.inference,
            "test_transforms": predictor.test_transform_configs,
            "images": len(images),
            "succeeded": len(writer.images),
            "seconds": seconds,
        }
        writer.finish(summary)
    done = len(writer.images)
    files = "panoptic.json, instances.json, panoptic/, semantic/, overlays/"
    print(f"{done}/{len(images)} images -> {out_dir} ({files}) in {seconds:.1f} s")
    if writer.failed:
        print(f"{len(writer.failed)} images failed (listed in {out_dir / 'summary.json'}):")
        for failure in writer.failed:
            print(f"  {failure['file']}: {failure['error']}")
    metrics = {"images": len(images), "succeeded": done, "failed": len(writer.failed), "seconds": seconds}
    return metrics, {"output_dir": out_dir, "json": out_dir / "panoptic.json", "failed": writer.failed}


def _predict_group(
    predictor: Predictor, inference: Mask2FormerInference, writer: PredictionWriter, items: list, device: torch.device
) -> None:
    """Predict and write a batch of prepared items; a failing batch of several is retried image by image, so
    only the culprit is skipped."""
    if not items:
        return
    try:
        predictions = predict_batch(predictor, inference, items, device)
    except Exception as error:  # one bad image must not stop the others
        if len(items) == 1:
            writer.fail(items[0][0], error)
        else:
            for item in items:
                _predict_group(predictor, inference, writer, [item], device)
        return
    for (path, image_id, rgb, _), prediction in zip(items, predictions):
        try:
            count = writer.add(image_id, path, rgb, prediction)
        except Exception as error:
            writer.fail(path, error)
            continue
        log.info(f"{path.name}: {count} segments")
