"""Checkpoint conversion: Hugging Face and detectron2 Mask2Former weights and official PRO-SCALE checkpoints ->
proscale names, file IO and a strict loader that reports missing / unused keys."""

from proscale.convert.detectron2 import detectron2_to_proscale
from proscale.convert.hf import hf_to_proscale
from proscale.convert.io import LoadReport, load_into, read_state_dict, write_state_dict
from proscale.convert.proscale_official import (
    infer_proscale_schedule,
    official_encoder_config,
    proscale_official_to_proscale,
)

__all__ = [
    "LoadReport",
    "detectron2_to_proscale",
    "hf_to_proscale",
    "infer_proscale_schedule",
    "load_into",
    "official_encoder_config",
    "proscale_official_to_proscale",
    "read_state_dict",
    "write_state_dict",
]
