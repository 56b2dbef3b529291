"""ImageNet backbone weights as users have them: what ``model.backbone.pretrained`` means, reading the file, and
the presets' requirement.

``model.backbone.pretrained`` takes (see :func:`pretrained_choice`):

- ``null`` (the default): no weights given. Random weights, except that presets with
  ``require_backbone_weights: true`` (COCO, ADE20K, Cityscapes) refuse to start (:func:`require_backbone_weights`).
- ``none`` (any case) or ``false``: random weights on purpose (train from scratch).
- ``true``: timm's own hub download (``timm.create_model(name, pretrained=True)``); offline it fails at once.
- a path: a local file, its format and layout found by content (:func:`read_backbone_state_dict`):

  ==========================  =================================================================================
  detectron2 ``.pkl``          the torchvision-converted ``R-50.pkl`` Mask2Former starts from: a pickle of
                               ``{"model": {name: ndarray}, "__author__": "torchvision", ...}``, names
                               ``stem.conv1.*``, ``res2..res5.B.convK(.norm)``, ``shortcut(.norm)``
  torchvision ``.pth``         ``conv1``, ``bn1``, ``layerN.B.convK/bnK``, ``downsample.0/1``, ``fc``
  timm ``.pth/.safetensors``   timm's names (for ResNets the same as torchvision's)
  official Swin ``.pth``       ``{"model": {...}}`` with the patch merging at the *end* of a stage, ``head.*`` and
                               the ``relative_position_index`` / ``attn_mask`` buffers; timm's own
                               ``checkpoint_filter_fn`` turns it into timm names
  ==========================  =================================================================================

  The MSRA caffe2 ``R-50.pkl`` (``res2_0_branch2a_w``..., BGR input, std 1) is refused: it expects another input
  convention. ``.pkl`` files go through the restricted unpickler and torch files through ``weights_only`` loading
  (:mod:`proscale.utils.safe_load`), so a weight file cannot run code unless ``allow_unsafe_load``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from proscale.convert.io import as_tensor_dict
from proscale.utils.safe_load import UnsafeFileError, file_kind, load_pickled

NOT_SET = None  # pretrained_choice: no weights given
FROM_SCRATCH = "from_scratch"  # pretrained_choice: random weights on purpose
FROM_HUB = "hub"  # pretrained_choice: timm's hub download
FROM_FILE = "file"  # pretrained_choice: a local file

# names of the MSRA caffe2 ResNet pickles (e.g. conv1_w, res_conv1_bn_s, res2_0_branch2a_w, fc1000_b)
_CAFFE2_NAME = re.compile(r"^(conv1_[wb]|res_conv1_bn_\w+|res\d+_\d+_branch\w+|fc1000_[wb])$")
# detectron2 ResNets always have res2..res5 blocks; `stem.` alone is also timm's name for RegNet / ConvNeXt stems
_DETECTRON2_NAME = re.compile(r"^res[2-5]\.")

# where to get ImageNet weights, by timm model name
WEIGHT_SOURCES = {
    "resnet50": (
        "detectron2's torchvision-converted R-50.pkl (what Mask2Former starts from): "
        "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl, or torchvision's "
        "https://download.pytorch.org/models/resnet50-0676ba61.pth, or a timm resnet50 .pth/.safetensors"
    ),
    "swin_tiny_patch4_window7_224": (
        "the official Swin-T ImageNet-1k file (what Mask2Former starts from): "
        "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth, "
        "or a timm swin_tiny_patch4_window7_224 .pth/.safetensors"
    ),
}
# the timm model behind each named backbone of proscale.models.backbones
_TIMM_MODEL = {"r50": "resnet50", "swin_t": "swin_tiny_patch4_window7_224"}


def pretrained_choice(value: Any) -> str | None:
    """Classify a ``model.backbone.pretrained`` value: ``NOT_SET``, ``FROM_SCRATCH``, ``FROM_HUB`` or ``FROM_FILE``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return NOT_SET
    if value is False or (isinstance(value, str) and value.strip().lower() in ("none", "false")):
        return FROM_SCRATCH
    if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
        return FROM_HUB
    if isinstance(value, (str, os.PathLike)):
        return FROM_FILE
    raise ValueError(
        f"model.backbone.pretrained={value!r}: expected a file path, true (timm hub), none (train from scratch) or null"
    )


def _read_raw(path: Path, allow_unsafe: bool) -> Any:
    """Load the file's object, choosing the reader by its first bytes (:func:`~proscale.utils.safe_load.file_kind`)."""
    kind = file_kind(path, "backbone weights")
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_pickled(path, kind, allow_unsafe)


def _weights_mapping(raw: Any, path: Path) -> Mapping:
    """The ``{name: array}`` part of the loaded object: the object itself, or its ``model`` / ``state_dict`` /
    ``blobs`` (caffe2 pickles) entry."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"backbone weights {path} hold a {type(raw).__name__}, not a dict of arrays")
    for key in ("model", "state_dict", "blobs"):
        if isinstance(raw.get(key), Mapping):
            return raw[key]
    return raw


def _strip_common_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.`` (DDP) / ``model.`` / ``backbone.`` when *every* key carries it."""
    for prefix in ("module.", "model.", "backbone."):
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def detectron2_to_torchvision_name(name: str) -> str:
    """Undo detectron2's ``convert-torchvision-to-d2`` renames (``stem.conv1.norm.weight`` -> ``bn1.weight``,
    ``res2.0.conv1.norm.bias`` -> ``layer1.0.bn1.bias``, ``res3.0.shortcut.norm.x`` -> ``layer2.0.downsample.1.x``)."""
    if name.startswith("stem."):
        return re.sub(r"^conv1\.norm\.", "bn1.", name[len("stem.") :])
    match = re.match(r"^res([2-5])\.(.*)$", name)
    if match is None:
        return name
    rest = re.sub(r"(^|\.)conv([1-3])\.norm\.", r"\1bn\2.", match.group(2))
    rest = rest.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return f"layer{int(match.group(1)) - 1}.{rest}"


def read_backbone_state_dict(path: str | os.PathLike, allow_unsafe: bool = False) -> tuple[dict[str, Tensor], str]:
    """Read an ImageNet backbone file (any layout of the module docstring) as ``({timm/torchvision name: tensor},
    layout)``, ``layout`` one of ``"detectron2"``, ``"torch"`` (torchvision / timm / official Swin names).

    Raises ValueError naming the file for a missing, corrupt or unknown file and for the caffe2 layout;
    :class:`~proscale.utils.safe_load.UnsafeFileError` for a file that would need unrestricted unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backbone weights {path} (model.backbone.pretrained) does not exist")
    try:
        raw = _read_raw(path, allow_unsafe)
    except UnsafeFileError:
        raise
    except Exception as error:  # corrupt / truncated files raise many different types
        raise ValueError(f"cannot read backbone weights {path}: {type(error).__name__}: {error}") from error
    weights = _weights_mapping(raw, path)
    caffe2 = [str(key) for key in weights if _CAFFE2_NAME.match(str(key))]
    if caffe2:
        raise ValueError(
            f"backbone weights {path} are in the MSRA caffe2 layout ({', '.join(sorted(caffe2)[:3])}, ...): those "
            "ResNets expect BGR input with std 1, which this project does not use. Use detectron2's "
            "torchvision-converted R-50.pkl instead (what Mask2Former's R50 configs start from): "
            "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
        )
    state = _strip_common_prefixes(as_tensor_dict(weights, path, "backbone weights"))
    if any(_DETECTRON2_NAME.match(key) for key in state):
        return {detectron2_to_torchvision_name(key): value for key, value in state.items()}, "detectron2"
    return state, "torch"


def timm_model_name(backbone_cfg: Mapping[str, Any]) -> str:
    """The timm model of a ``model.backbone`` config (``name`` r50 / swin_t, or timm + ``model_name``)."""
    name = str(backbone_cfg.get("name", ""))
    return _TIMM_MODEL.get(name, str(backbone_cfg.get("model_name", name)))


def weight_sources(model_name: str) -> str:
    """Where to get ImageNet weights for a timm model (a sentence for error messages)."""
    if model_name in WEIGHT_SOURCES:
        return WEIGHT_SOURCES[model_name]
    return (
        f"timm's {model_name} weights (model.safetensors of a timm/{model_name}.* repository on the Hugging Face hub)"
    )


def require_backbone_weights(cfg: Any) -> None:
    """Refuse to start a preset marked ``require_backbone_weights: true`` whose backbone would start random without
    the user saying so. Passes when ``model.backbone.pretrained`` is set (a path, ``true`` or ``none``), when
    ``pretrain`` will produce weights, and when the run resumes (``ckpt_path``) or starts from full-model
    ``weights``. Called before any data is read."""
    if not cfg.get("require_backbone_weights"):
        return
    backbone = cfg.model.backbone
    if pretrained_choice(backbone.get("pretrained")) is not NOT_SET:
        return
    if cfg.get("pretrain") or cfg.get("ckpt_path") or cfg.get("weights"):
        return
    raise ValueError(
        f"experiment {cfg.get('experiment_name')!r} starts from ImageNet backbone weights (paper numbers need them), "
        f"and model.backbone.pretrained is not set. Get them (nothing is downloaded here): {weight_sources(timm_model_name(backbone))}; "
        "then pass model.backbone.pretrained=/path/to/file. Or model.backbone.pretrained=true to let timm download "
        "its weights (needs network and HF_HUB_OFFLINE=0), or model.backbone.pretrained=none to train from scratch "
        "on purpose."
    )


__all__ = [
    "FROM_FILE",
    "FROM_HUB",
    "FROM_SCRATCH",
    "NOT_SET",
    "detectron2_to_torchvision_name",
    "pretrained_choice",
    "read_backbone_state_dict",
    "require_backbone_weights",
    "timm_model_name",
    "weight_sources",
]
