"""Checkpoint conversion: Hugging Face and detectron2 Mask2Former weights -> proscale names, file IO and a
strict loader that reports missing / unused keys."""

from proscale.convert.detectron2 import detectron2_to_proscale
from proscale.convert.hf import hf_to_proscale
from proscale.convert.io import LoadReport, load_into, read_state_dict, write_state_dict

__all__ = ["LoadReport", "detectron2_to_proscale", "hf_to_proscale", "load_into", "read_state_dict", "write_state_dict"]
