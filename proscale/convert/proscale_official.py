"""Official PRO-SCALE checkpoints (github.com/abhishekaich27/proscale-pytorch) -> proscale state dict.

The released checkpoints are detectron2 Mask2Former checkpoints with a different pixel decoder:

- ``sem_seg_head.pixel_decoder.transformer.encoder.layers.{k}.*``: the encoder layers, indexed flat
  across stages (k = 0 .. p1+p2+p3-1, stage 1 first). Our :class:`~proscale.models.encoders.ProScaleEncoder`
  stores them in the same flat ``layers`` list, so the indices carry over unchanged; the stage of a layer
  follows from the schedule, and the schedule itself can be read off the checkpoint: a layer built for
  L levels has ``sampling_offsets`` with ``n_heads * L * n_points * 2`` outputs
  (:func:`infer_proscale_schedule`).
- ``sem_seg_head.pixel_decoder.transformer.encoder.token_excite.ops.{weight,bias}``: TRC's
  ``Linear(256, 1)`` -> ``pixel_decoder.encoder.trc.linear.{weight,bias}``.
- LPE: ``layer_1`` is a max-pool, so the checkpoint has only ``layer_1.norm.{weight,bias}`` (no conv
  weight); they map to the pixel decoder's GroupNorm like M2F's ``layer_1.norm``.

Everything else is M2F naming and is delegated to :func:`proscale.convert.detectron2_to_proscale`.
To reproduce the official outputs, build the encoder with ``trc=True, trc_layout="released"`` (the
released code's reshape, see :mod:`proscale.models.encoders.trc`), ``trc_temperature=0.1``, the inferred
schedule and ``lpe=True``; :func:`official_encoder_config` returns those settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import Tensor

from proscale.convert.detectron2 import detectron2_to_proscale

OFFICIAL_LAYER = re.compile(
    r"(?:module\.)?sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.sampling_offsets\.weight"
)
TRC_PREFIX = "pixel_decoder.encoder.token_excite.ops."
TRC_TARGET = "pixel_decoder.encoder.trc.linear."


def infer_proscale_schedule(state_dict: Mapping[str, Tensor], n_heads: int = 8, n_points: int = 4) -> tuple[int, ...]:
    """Read (p1, p2, p3) off an official checkpoint from every layer's number of levels.

    Raises ValueError if there are no encoder layers, a layer's level count is not an integer in 1..3,
    the flat indices have gaps, or the levels do not grow with depth (i.e. it is not a PRO-SCALE schedule).
    """
    levels: dict[int, int] = {}
    per_level = n_heads * n_points * 2
    for key, value in state_dict.items():
        match = OFFICIAL_LAYER.fullmatch(key)
        if match is None:
            continue
        out_features = value.shape[0]
        if out_features % per_level:
            raise ValueError(
                f"{key}: {out_features} sampling offsets is not a multiple of n_heads*n_points*2 = {per_level}"
            )
        levels[int(match.group(1))] = out_features // per_level
    if not levels:
        raise ValueError(
            "no 'sem_seg_head.pixel_decoder.transformer.encoder.layers.{k}' keys: not a PRO-SCALE checkpoint"
        )
    if sorted(levels) != list(range(len(levels))):
        raise ValueError(f"encoder layer indices have gaps: {sorted(levels)}")
    ordered = [levels[k] for k in range(len(levels))]
    if any(not 1 <= n <= 3 for n in ordered) or ordered != sorted(ordered) or ordered[-1] != 3:
        raise ValueError(f"encoder layers have levels {ordered}: not a PRO-SCALE schedule (1s, then 2s, then 3s)")
    return tuple(ordered.count(level) for level in (1, 2, 3))


def proscale_official_to_proscale(
    state_dict: Mapping[str, Tensor],
    schedule: Sequence[int] | None = None,
    n_heads: int = 8,
    n_points: int = 4,
) -> dict[str, Tensor]:
    """Rename an official PRO-SCALE state dict (ResNet or Swin backbone) into proscale names.

    Args:
        state_dict: the checkpoint's ``"model"`` dict (see :func:`proscale.convert.read_state_dict`).
        schedule: the schedule the target model is built with; checked against the checkpoint's
            (ValueError naming both when they differ). None = no check.
        n_heads, n_points: encoder attention layout (8, 4), used to read the levels of every layer.

    Unknown keys pass through unchanged, so :func:`proscale.convert.load_into` names them.
    """
    found = infer_proscale_schedule(state_dict, n_heads, n_points)
    if schedule is not None and tuple(schedule) != found:
        raise ValueError(
            f"checkpoint has PRO-SCALE schedule {list(found)} but the model is built with {list(schedule)}; "
            f"set model.encoder.schedule={list(found)}"
        )
    converted = detectron2_to_proscale(state_dict)
    out: dict[str, Tensor] = {}
    for key, value in converted.items():
        if key.startswith(TRC_PREFIX):
            if value.dim() > 2:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}: the convolutional TRC (IS_EXCITE_CONV=True) is not "
                    "supported; released checkpoints use the linear one"
                )
            key = TRC_TARGET + key[len(TRC_PREFIX) :]
        out[key] = value
    return out


def official_encoder_config(state_dict: Mapping[str, Tensor], n_heads: int = 8, n_points: int = 4) -> dict:
    """Overrides that rebuild the official model: ``{"schedule", "trc", "trc_layout", "trc_temperature",
    "residual"}`` for the encoder plus ``"lpe"`` (True when the checkpoint has no ``layer_1`` conv weight).

    The temperature is not stored in checkpoints; 0.1 is the released configs' value. Residual is off in
    every released config (and adds no weights, so it cannot be read off the file)."""
    has_trc = any(".transformer.encoder.token_excite.ops." in k for k in state_dict)
    lpe = not any(k.endswith("pixel_decoder.layer_1.weight") for k in state_dict)
    return {
        "schedule": list(infer_proscale_schedule(state_dict, n_heads, n_points)),
        "trc": has_trc,
        "trc_layout": "released",
        "trc_temperature": 0.1,
        "residual": False,
        "lpe": lpe,
    }


__all__ = ["infer_proscale_schedule", "official_encoder_config", "proscale_official_to_proscale"]
