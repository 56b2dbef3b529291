"""Compute analysis of a Mask2Former-family model: GFLOPs and parameters per part, with fvcore's conventions.

How the numbers are made (and why they match the paper's ``tools/analyze_model.py`` protocol):

- Conventions (:mod:`proscale.analysis.flop_formulas`): one multiply-add = 1 flop; conv, linear, matmul,
  bmm, einsum, baddbmm, addmm and attention kernels by their MACs; ``grid_sampler`` 4 per output element;
  group/layer norm 5 per element with affine; bilinear upsample 4 per output element, nearest 1; adaptive
  average pooling 1 per input element; softmax, max-pool and element-wise operations 0.
- The network forward (eval mode, batch 1) is run on meta tensors under a counting dispatch mode
  (:mod:`proscale.analysis.flop_counter`); module forward hooks attribute each operator to its modules.
  Deformable attention is counted with its reference ``grid_sample`` kernel whatever kernel the model is
  set to use (the fast gather kernel computes the same function but no convention prices gathers), as the
  original Mask2Former's pure-PyTorch fallback is counted by detectron2's tool.
- Post-processing (semantic + instance + panoptic inference at the original image size, the part of the
  forward that detectron2 counts in eval mode) depends on data (how many queries pass a threshold), so it
  is counted analytically by :func:`postprocess_flops`, with the same conventions, following
  :class:`proscale.models.inference.Mask2FormerInference` operation by operation. A test runs that module
  on real tensors under the counter and checks the formula exactly.
- Default protocol = COCO test time: a 480x640 image is resized to 800x1067 (short side 800, long side <=
  1333) and padded to 800x1088; :func:`resize_for_test` does this for any original size and
  :func:`count_flops_average` averages over a list of original sizes.

Parts (keys of :func:`count_flops`, GFLOPs; same keys, as integers, in :func:`count_params`):

=====================  ===========================================================================
``backbone``           ``model.backbone``
``encoder``            ``model.pixel_decoder`` without its final 1x1 ``mask_features`` projection (the
                       paper's "encoder": input projections + encoder + FPN tail)
``encoder_layers``     ``model.pixel_decoder.encoder`` alone: the attention/FFN layers (plus the encoder's
                       own light ops, e.g. PRO-SCALE's TRC gates, ~0.01 G; RT-M2F: AIFI + CCFM)
``mask_projection``    ``model.pixel_decoder.mask_features``
``transformer_decoder``  ``model.transformer_decoder`` (all 10 predictions, attention masks included)
``other``              anything ``model.forward`` runs outside those modules (0 for Mask2Former)
``postprocess``        analytic, see :func:`postprocess_flops` (0 in ``count_params``)
``total``              the whole forward + post-processing
=====================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from proscale.analysis.flop_counter import TOTAL, count_call_flops

GIGA = 1e9
COCO_ORIG_SIZE = (480, 640)
COCO_IMAGE_SIZE = (800, 1088)

# Part name -> qualified module name inside Mask2Former (see the project's model contract).
PART_MODULES = {
    "backbone": "backbone",
    "pixel_decoder": "pixel_decoder",
    "mask_projection": "pixel_decoder.mask_features",
    "encoder_layers": "pixel_decoder.encoder",
    "transformer_decoder": "transformer_decoder",
}
PART_KEYS = (
    "backbone",
    "encoder",
    "encoder_layers",
    "mask_projection",
    "transformer_decoder",
    "other",
    "postprocess",
    "total",
)


def resize_for_test(
    orig_size: tuple[int, int], short_side: int = 800, max_size: int = 1333, size_divisibility: int = 32
) -> tuple[tuple[int, int], tuple[int, int]]:
    """COCO test-time resize (detectron2 ``ResizeShortestEdge``) then padding to a multiple of 32.

    Returns ``((h, w) resized, (H, W) padded)``; e.g. (480, 640) -> ((800, 1067), (800, 1088)).
    """
    height, width = orig_size
    if height < 1 or width < 1:
        raise ValueError(f"resize_for_test: orig_size must be positive, got {orig_size}")
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    resized = (int(new_h + 0.5), int(new_w + 0.5))
    padded = tuple(-(-s // size_divisibility) * size_divisibility for s in resized)
    return resized, padded  # type: ignore[return-value]


def postprocess_flops(
    num_queries: int,
    num_classes: int,
    padded_size: tuple[int, int],
    orig_size: tuple[int, int],
    semantic: bool = True,
    instance: bool = True,
    panoptic: bool = True,
) -> int:
    """Flops of Mask2Former inference for one image, counted analytically with fvcore's conventions.

    Following ``Mask2FormerInference.forward`` (Q queries, K classes, padded (H, W), original (h0, w0)):

    - mask logits (Q, H/4, W/4) -> bilinear to (H, W): 4 * Q * H * W;
      crop to the valid region (free), bilinear to (h0, w0): 4 * Q * h0 * w0 (shared by all three tasks);
    - semantic: ``einsum("qc,qhw->chw")`` of class probabilities and mask sigmoids: Q * K * h0 * w0;
    - panoptic: only softmax/max, thresholding, a score-weighted product, argmax, gather and bincounts, all
      element-wise or reductions: 0 whatever number of queries is kept (the data-dependent part);
    - instance: top-k over Q*K scores, sigmoid, threshold and a masked mean: element-wise, 0.

    Returns 0 when no task is enabled.
    """
    if not (semantic or instance or panoptic):
        return 0
    padded_h, padded_w = padded_size
    height, width = orig_size
    resize = 4 * num_queries * padded_h * padded_w + 4 * num_queries * height * width
    semantic_flops = num_queries * num_classes * height * width if semantic else 0
    return resize + semantic_flops


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"compute analysis: the model has no submodule {name!r}; it expects Mask2Former's layout "
            f"({', '.join(PART_MODULES.values())})"
        ) from None


def _parts(by_module: dict[str, float], model_total: float) -> dict[str, float]:
    """Per-part values from inclusive per-module values (flops or parameters)."""
    backbone = by_module.get(PART_MODULES["backbone"], 0)
    pixel_decoder = by_module.get(PART_MODULES["pixel_decoder"], 0)
    mask_projection = by_module.get(PART_MODULES["mask_projection"], 0)
    transformer_decoder = by_module.get(PART_MODULES["transformer_decoder"], 0)
    return {
        "backbone": backbone,
        "encoder": pixel_decoder - mask_projection,
        "encoder_layers": by_module.get(PART_MODULES["encoder_layers"], 0),
        "mask_projection": mask_projection,
        "transformer_decoder": transformer_decoder,
        "other": model_total - backbone - pixel_decoder - transformer_decoder,
    }


def _count_forward(model: nn.Module, image_size: tuple[int, int], device: str) -> tuple[dict[str, float], int, int]:
    """Forward flops per part (no post-processing) and the model's (num_queries, num_classes)."""
    height, width = (int(s) for s in image_size)
    if height < 32 or width < 32:
        raise ValueError(f"count_flops: image_size must be at least 32x32, got {image_size}")
    for name in PART_MODULES.values():
        _module(model, name)
    tensor_device = "meta" if device == "meta" else next(model.parameters()).device
    images = torch.zeros(1, 3, height, width, device=tensor_device)
    counted = count_call_flops(model, (images,), device=device)
    parts = _parts(counted.by_module, counted.by_module[TOTAL])
    parts["forward"] = counted.by_module[TOTAL]
    num_queries, num_classes_plus_one = counted.output["pred_logits"].shape[-2:]
    return parts, int(num_queries), int(num_classes_plus_one) - 1


def count_flops(
    model: nn.Module,
    image_size: tuple[int, int] | None = COCO_IMAGE_SIZE,
    orig_size: tuple[int, int] = COCO_ORIG_SIZE,
    postprocess: bool = True,
    device: str = "meta",
) -> dict[str, float]:
    """GFLOPs of one image through ``model`` (eval mode) and its inference, per part (module docstring).

    Args:
        model: a Mask2Former (``backbone``, ``pixel_decoder.{encoder,mask_features}``, ``transformer_decoder``),
            on any device, meta included. Its weights are never touched.
        image_size: padded network input (H, W), multiples of 32; ``None`` = COCO test-time size of
            ``orig_size`` (:func:`resize_for_test`).
        orig_size: (h0, w0) size the inference resizes the masks to.
        postprocess: include semantic + instance + panoptic inference (:func:`postprocess_flops`).
        device: ``"meta"`` (default, shapes only) or ``"real"`` (runs on tensors of zeros on the model's
            device; needed only if a forward pass uses data-dependent operators).

    Returns:
        ``{"backbone", "encoder", "encoder_layers", "mask_projection", "transformer_decoder", "other",
        "postprocess", "total"}`` in GFLOPs (1e9 multiply-adds).
    """
    if image_size is None:
        image_size = resize_for_test(orig_size)[1]
    parts, num_queries, num_classes = _count_forward(model, image_size, device)
    parts["postprocess"] = (
        postprocess_flops(num_queries, num_classes, tuple(image_size), orig_size) if postprocess else 0
    )
    parts["total"] = parts["forward"] + parts["postprocess"]
    return {key: parts[key] / GIGA for key in PART_KEYS}


def count_flops_average(
    model: nn.Module,
    orig_sizes: Sequence[tuple[int, int]],
    short_side: int = 800,
    max_size: int = 1333,
    postprocess: bool = True,
    device: str = "meta",
) -> dict[str, float]:
    """Mean of :func:`count_flops` over images of the given original sizes, each at its test-time size.

    This is the paper's protocol when ``orig_sizes`` are the sizes of 100 COCO val images. The forward is
    counted once per distinct padded size.
    """
    if not orig_sizes:
        raise ValueError("count_flops_average: orig_sizes is empty")
    forward_cache: dict[tuple[int, int], tuple[dict[str, float], int, int]] = {}
    sums = dict.fromkeys(PART_KEYS, 0.0)
    for orig in orig_sizes:
        orig = (int(orig[0]), int(orig[1]))
        _, padded = resize_for_test(orig, short_side, max_size)
        if padded not in forward_cache:
            forward_cache[padded] = _count_forward(model, padded, device)
        forward, num_queries, num_classes = forward_cache[padded]
        parts = dict(forward)
        parts["postprocess"] = postprocess_flops(num_queries, num_classes, padded, orig) if postprocess else 0
        parts["total"] = parts["forward"] + parts["postprocess"]
        for key in PART_KEYS:
            sums[key] += parts[key] / GIGA
    return {key: value / len(orig_sizes) for key, value in sums.items()}


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts per part (same keys as :func:`count_flops`; ``postprocess`` is 0), shared tensors once."""
    for name in PART_MODULES.values():
        _module(model, name)
    by_module = {name: sum(p.numel() for p in _module(model, name).parameters()) for name in PART_MODULES.values()}
    total = sum(p.numel() for p in model.parameters())
    parts = {key: int(value) for key, value in _parts(by_module, total).items()}
    parts["postprocess"] = 0
    parts["total"] = int(total)
    return {key: parts[key] for key in PART_KEYS}


__all__ = [
    "COCO_IMAGE_SIZE",
    "COCO_ORIG_SIZE",
    "PART_KEYS",
    "count_flops",
    "count_flops_average",
    "count_params",
    "postprocess_flops",
    "resize_for_test",
]
