"""Framework utilities: atomic file writes, results.json, rich output, logging and Hydra instantiation helpers."""

from proscale.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text
from proscale.utils.logging_utils import get_logger
from proscale.utils.results import RESULTS_FILENAME, read_results, write_results

__all__ = [
    "RESULTS_FILENAME",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "get_logger",
    "read_results",
    "write_results",
]
