"""``read_weights``: any supported weight file or folder -> a proscale state dict + what the file says about the model.

The format is found by content, never by file extension:

1. a folder with ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``: a Hugging Face Mask2Former (``hf``);
2. a file's first bytes tell safetensors, ``torch.save`` (zip, or the legacy pickle that starts with torch's magic
   number) or a plain pickle (detectron2 ``.pkl``);
3. the loaded object then decides: a Lightning checkpoint (``state_dict`` + ``hyper_parameters`` /
   ``pytorch-lightning_version``) is ``lightning``; otherwise the weights (under ``model`` / ``state_dict`` or the
   top level) are named like detectron2 (``sem_seg_head.*``, ``backbone.res2.*``; ``proscale_official`` when the
   encoder has PRO-SCALE stages or TRC, else ``detectron2``), like HF (``pixel_level_module.*``) or like proscale
   (``pixel_decoder.*`` / ``transformer_decoder.*``, also under ``model.`` / ``module.``: ``state_dict``).

Every pickle goes through :mod:`proscale.utils.safe_load` (refused unless ``allow_unsafe``); safetensors cannot
hold code. Files written by ``scripts/convert_weights.py`` carry the derived overrides in the safetensors header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from proscale.convert.detectron2 import detectron2_to_proscale
from proscale.convert.hf import hf_to_proscale
from proscale.convert.io import as_tensor_dict, strip_common_prefix
from proscale.convert.proscale_official import official_encoder_config, proscale_official_to_proscale
from proscale.utils.safe_load import UnsafeFileError, file_kind, load_pickled, torch_load
from proscale.weights.architecture import derive_overrides, encoder_levels, hf_config_overrides

FORMATS = ("lightning", "state_dict", "proscale_official", "detectron2", "hf")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# safetensors header keys written by scripts/convert_weights.py (JSON strings)
METADATA_PREFIX = "proscale."
_METADATA_FIELDS = ("model_config", "derived_overrides", "meta", "inference", "test_transforms")
_OUR_ROOTS = ("backbone.", "pixel_decoder.", "transformer_decoder.")


@dataclass
class LoadedWeights:
    """Weights in proscale names plus what the file says about the model (see ``proscale/weights``'s contract)."""

    path: Path
    format: str
    state_dict: dict[str, Tensor]  # keys of proscale.models.Mask2Former (no "model." prefix)
    model_config: dict | None = None  # the full model config (this project's checkpoints)
    derived_overrides: dict[str, Any] | None = None  # dotted keys relative to the model config
    meta: dict | None = None  # DatasetMeta fields
    inference: dict | None = None  # Mask2FormerInference kwargs other than num_classes / thing_classes
    test_transforms: list | None = None  # Hydra configs of the test-time transforms
    ema: bool = False  # the EMA weights were taken

    def __post_init__(self) -> None:
        if self.derived_overrides is None:
            self.derived_overrides = {}


def read_weights(path: str | os.PathLike, *, use_ema: bool = True, allow_unsafe: bool = False) -> LoadedWeights:
    """Read a weight file or HF folder (format by content, see the module docstring).

    Raises :class:`~proscale.utils.safe_load.UnsafeFileError` for pickles that could run code (unless
    ``allow_unsafe``), ``ValueError`` naming the file for anything missing, corrupt or of an unknown layout.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return _read_hf_folder(path, allow_unsafe)
        if not path.is_file():
            raise ValueError(f"weights {path}: no such file or folder")
        kind = file_kind(path, "weights")
        if kind == "safetensors":
            return _from_safetensors(path)
        raw = load_pickled(path, kind, allow_unsafe)
        return _classify(raw, path, use_ema)
    except UnsafeFileError:
        raise
    except ValueError as error:
        message = str(error)
        raise ValueError(message if str(path) in message else f"weights {path}: {message}") from None
    except Exception as error:  # truncated / corrupt files raise many different types
        raise ValueError(f"cannot read weights {path}: {type(error).__name__}: {error}") from None


# ------------------------------------------------------------------ bytes -> objects
def _from_safetensors(path: Path) -> LoadedWeights:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no items()
    stored = {
        field: json.loads(metadata[METADATA_PREFIX + field])
        for field in _METADATA_FIELDS
        if METADATA_PREFIX + field in metadata
    }
    loaded = _from_state_dict(state, path)
    if stored:  # a file written by scripts/convert_weights.py: what the source said beats what shapes say
        loaded.derived_overrides = {**loaded.derived_overrides, **stored.pop("derived_overrides", {})}
        for field, value in stored.items():
            setattr(loaded, field, value)
    return loaded


# ------------------------------------------------------------------ objects -> LoadedWeights
def _is_lightning(raw: Mapping) -> bool:
    return isinstance(raw.get("state_dict"), Mapping) and any(
        key in raw for key in ("pytorch-lightning_version", "hyper_parameters", "global_step")
    )


def _classify(raw: Any, path: Path, use_ema: bool) -> LoadedWeights:
    if not isinstance(raw, Mapping):
        raise ValueError(f"weights {path} hold a {type(raw).__name__}, not a dict of tensors")
    if _is_lightning(raw):
        return _from_lightning(raw, path, use_ema)
    for key in ("model", "state_dict"):
        if isinstance(raw.get(key), Mapping):
            return _from_state_dict(raw[key], path)
    return _from_state_dict(raw, path)


def _from_lightning(raw: Mapping, path: Path, use_ema: bool) -> LoadedWeights:
    """This project's checkpoint: the module's ``model.*`` weights, or the EMA shadow when the run evaluated with
    it; ``hyper_parameters`` hold the model config, class metadata, inference settings and test transforms."""
    hparams = raw.get("hyper_parameters") or {}
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    if not weights or not hparams.get("model_config"):  # another project's Lightning checkpoint: judge the names
        loaded = _from_state_dict(raw["state_dict"], path)
        loaded.format = "lightning"
        return loaded
    ema_state = raw.get("ema")
    took_ema = bool(use_ema and hparams.get("ema_decay") and isinstance(ema_state, Mapping) and "shadow" in ema_state)
    if took_ema:
        weights = dict(ema_state["shadow"])
    return LoadedWeights(
        path=path,
        format="lightning",
        state_dict=as_tensor_dict(weights, path, "weights"),
        model_config=dict(hparams["model_config"]),
        meta=hparams.get("meta"),
        inference=hparams.get("inference"),
        test_transforms=hparams.get("test_transforms"),
        ema=took_ema,
    )


def _naming(keys: list[str]) -> str | None:
    """``detectron2`` | ``hf`` | ``proscale`` | None, from the key names."""
    if any(k.startswith(("sem_seg_head.", "backbone.stem.", "backbone.res2.")) for k in keys):
        return "detectron2"
    if any(k.startswith(("pixel_level_module.", "model.pixel_level_module.", "transformer_module.")) for k in keys):
        return "hf"
    if any(k.startswith(_OUR_ROOTS) for k in keys):
        return "proscale"
    return None


def _from_state_dict(raw: Mapping, path: Path) -> LoadedWeights:
    state = strip_common_prefix(as_tensor_dict(raw, path, "weights"), ("module.",))
    naming = _naming(list(state))
    if naming is None and any(k.startswith(tuple("model." + r for r in _OUR_ROOTS)) for k in state):
        # a wrapper's state dict (e.g. a LightningModule's): keep the model's entries, drop its loss buffers
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        naming = "proscale"
    if naming is None:
        shown = ", ".join(list(state)[:5])
        raise ValueError(
            f"weights {path}: not a Mask2Former checkpoint in a known layout (this project's, detectron2 / "
            f"official Mask2Former or PRO-SCALE, Hugging Face); its first keys: {shown}"
        )
    if naming == "hf":
        converted = hf_to_proscale(state)
        return LoadedWeights(path, "hf", converted, derived_overrides=derive_overrides(converted))
    if naming == "detectron2":
        return _from_detectron2(state, path)
    return LoadedWeights(path, "state_dict", state, derived_overrides=derive_overrides(state))


def _from_detectron2(state: dict[str, Tensor], path: Path) -> LoadedWeights:
    """Mask2Former's detectron2 names; the official PRO-SCALE release when the encoder grows or has TRC."""
    generic = detectron2_to_proscale(state)
    levels = encoder_levels(generic)
    official = any(".token_excite." in k for k in generic) or any(n != 3 for n in levels)
    if not official:
        return LoadedWeights(path, "detectron2", generic, derived_overrides=derive_overrides(generic))
    # the official converter checks sizes against n_heads * n_points; only their product matters, read it off the
    # last layer (it attends to all 3 levels) so that files with other head / point counts are read too
    last = generic[f"pixel_decoder.encoder.layers.{len(levels) - 1}.self_attn.sampling_offsets.weight"]
    heads_x_points = last.shape[0] // (3 * 2)
    converted = proscale_official_to_proscale(state, n_heads=heads_x_points, n_points=1)
    derived = derive_overrides(converted)
    settings = official_encoder_config(state, n_heads=heads_x_points, n_points=1)
    derived.update({f"encoder.{k}": v for k, v in settings.items() if k not in ("lpe", "schedule", "trc")})
    return LoadedWeights(path, "proscale_official", converted, derived_overrides=derived)


def _read_hf_folder(folder: Path, allow_unsafe: bool) -> LoadedWeights:
    config_path = folder / "config.json"
    weights_path = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if not config_path.is_file() or weights_path is None:
        raise ValueError(
            f"weights {folder}: a folder must be a Hugging Face Mask2Former model (config.json and "
            f"{' or '.join(HF_WEIGHT_FILES)}); found {sorted(p.name for p in folder.iterdir())[:10]}"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"weights {config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("model_type") != "mask2former":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"weights {config_path}: model_type is {found!r}, not 'mask2former'")
    if file_kind(weights_path, "weights") == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
    else:
        state = as_tensor_dict(torch_load(weights_path, allow_unsafe=allow_unsafe), weights_path, "weights")
    if _naming(list(state)) != "hf":
        raise ValueError(f"weights {weights_path}: not Hugging Face Mask2Former names (first: {list(state)[:3]})")
    converted = hf_to_proscale(state)
    derived = {**derive_overrides(converted), **hf_config_overrides(config)}
    labels = config.get("id2label")
    if isinstance(labels, dict) and derived.get("num_classes") not in (None, len(labels)):
        raise ValueError(
            f"weights {folder}: config.json names {len(labels)} classes but the class head has "
            f"{derived['num_classes']} (+1 'no object')"
        )
    return LoadedWeights(folder, "hf", converted, derived_overrides=derived)


__all__ = ["FORMATS", "LoadedWeights", "read_weights"]
