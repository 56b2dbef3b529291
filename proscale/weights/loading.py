"""Copying :class:`~proscale.weights.formats.LoadedWeights` into a built model, strictly unless asked otherwise."""

from __future__ import annotations

from torch import nn

from proscale.convert.io import LoadReport, fit_report, load_into
from proscale.weights.formats import LoadedWeights

PARTIAL_OPT_IN = "weights_allow_partial=true"


def load_weights_into(model: nn.Module, loaded: LoadedWeights, allow_partial: bool = False) -> LoadReport:
    """Copy ``loaded.state_dict`` into ``model`` and print a one-line report.

    Strict by default: any missing, unexpected or differently shaped key raises ``ValueError`` naming the file
    and the keys, and nothing is copied. With ``allow_partial`` every fitting key is loaded (e.g. all but the
    class head when ``num_classes`` differs). Returns the report (``missing`` / ``unused`` / ``mismatched``).
    """
    source = f"{loaded.path} ({loaded.format}{', EMA weights' if loaded.ema else ''})"
    report = fit_report(model, loaded.state_dict)
    if not report.ok and not allow_partial:
        raise ValueError(
            f"weights {source} do not fit the model: {report.describe()}. Build the model the file was made for "
            f"(same model overrides), or pass {PARTIAL_OPT_IN} to load only the fitting keys (e.g. for another "
            "num_classes)"
        )
    load_into(model, loaded.state_dict, allow_partial=True)
    loaded_count = len(loaded.state_dict) - len(report.unused) - len(report.mismatched)
    print(f"weights {source}: {loaded_count} tensors loaded; {report.describe()}", flush=True)
    return report


__all__ = ["PARTIAL_OPT_IN", "load_weights_into"]
