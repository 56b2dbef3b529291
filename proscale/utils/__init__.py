"""Framework utilities: atomic file writes, results.json, rich output, logging and Hydra instantiation helpers.

Only the light, dependency-free helpers are re-exported here (so ``import proscale.utils`` stays cheap);
import the others from their modules (``proscale.utils.logging_utils``, ``.rich_utils``, ``.instantiate``, ...).
"""

from proscale.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text
from proscale.utils.results import RESULTS_FILENAME, read_results, write_results

__all__ = [
    "RESULTS_FILENAME",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "read_results",
    "write_results",
]
