"""One way to load weights for every task (train ``weights=``, eval, predict, export).

- :func:`read_weights`: a file or Hugging Face folder -> :class:`LoadedWeights` (format found by content:
  this project's Lightning checkpoints, plain state dicts, official PRO-SCALE, detectron2 / Mask2Former, HF);
- :func:`resolve_model_config`: the model config to build for it (stored, or configured + derived overrides);
- :func:`command_line_model_overrides`: the user's ``model.*`` overrides of the running Hydra app;
- :func:`load_weights_into`: copy the weights into the built model, strict unless ``allow_partial``.

Pickles load safely (:mod:`proscale.utils.safe_load`) unless ``allow_unsafe``.
"""

from proscale.convert.io import LoadReport
from proscale.weights.formats import FORMATS, LoadedWeights, read_weights
from proscale.weights.loading import load_weights_into
from proscale.weights.resolve import command_line_model_overrides, resolve_model_config

__all__ = [
    "FORMATS",
    "LoadReport",
    "LoadedWeights",
    "command_line_model_overrides",
    "load_weights_into",
    "read_weights",
    "resolve_model_config",
]
