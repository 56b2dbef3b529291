"""Compute analysis: GFLOPs / parameters per model part (``flops``) and the figures made from them (``plots``)."""

from proscale.analysis.flops import count_flops, count_flops_average, count_params, postprocess_flops, resize_for_test

__all__ = ["count_flops", "count_flops_average", "count_params", "postprocess_flops", "resize_for_test"]
