"""FLOP formulas per ATen operator, with fvcore's (and detectron2's ``analyze_model``) conventions.

One multiply-add counts as ONE flop, so the "GFLOPs" of the paper are GMACs. What is counted:

========================================  =====================================================
operator (as seen below autograd)         flops
========================================  =====================================================
mm, addmm (nn.Linear, matmul)             M * K * N (bias ignored)
bmm, baddbmm (matmul, einsum, attention)  B * M * K * N
scaled-dot-product attention kernels      B * H * L * S * (E + Ev)  (its two batched matmuls)
convolution                               batch * prod(weight.shape) * prod(output spatial)
grid_sampler_2d                           4 per output element (bilinear assumed, like fvcore)
native_group_norm, native_layer_norm      5 per input element with affine, 4 without
batch norm (inference)                    2 per input element with affine, 1 without
batch norm (training)                     5 / 4 per input element, like group norm
upsample_bilinear2d                       4 per output element
upsample_nearest2d                        1 per output element
adaptive_avg_pool2d                       1 per input element
========================================  =====================================================

Everything else (softmax, max-pool, element-wise arithmetic, reductions, copies, indexing) counts 0,
as in fvcore. Composite operators (``linear``, ``matmul``, ``einsum``, ``scaled_dot_product_attention``,
``interpolate``) reach a dispatch mode already decomposed into the rows above, so they are counted by
what they really execute: an ``einsum`` contraction costs its MACs, exactly what fvcore's einsum handle
computes. One known difference from tracing with fvcore: ``adaptive_avg_pool2d`` to a 1x1 output is
decomposed by PyTorch into ``mean`` and counts 0 here (no model in this project uses it).

Each formula takes the operator's ``(args, kwargs, out)`` with tensors (real, meta or fake: only shapes
are read) and returns an ``int``.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Any

import torch

aten = torch.ops.aten

FlopFormula = Callable[[tuple, dict, Any], int]


def _numel(t: Any) -> int:
    return prod(t.shape)


def _first_output(out: Any) -> Any:
    """Operators such as ``native_group_norm`` return (output, saved statistics...)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _mm(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _addmm(args: tuple, kwargs: dict, out: Any) -> int:
    return _mm(args[1:], kwargs, out)


def _bmm(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _baddbmm(args: tuple, kwargs: dict, out: Any) -> int:
    return _bmm(args[1:], kwargs, out)


def _sdpa(args: tuple, kwargs: dict, out: Any) -> int:
    """query (..., L, E), key (..., S, E), value (..., S, Ev): QK^T plus attention @ V."""
    query, key, value = args[0], args[1], args[2]
    batch = prod(query.shape[:-2])
    length, embed = query.shape[-2], query.shape[-1]
    source = key.shape[-2]
    return batch * length * source * (embed + value.shape[-1])


def _convolution(args: tuple, kwargs: dict, out: Any) -> int:
    x, weight = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get("transposed", False))
    spatial = x.shape[2:] if transposed else _first_output(out).shape[2:]
    return x.shape[0] * prod(weight.shape) * prod(spatial)


def _norm_with_affine_at(weight_index: int, with_affine: int, without_affine: int) -> FlopFormula:
    def formula(args: tuple, kwargs: dict, out: Any) -> int:
        weight = args[weight_index] if len(args) > weight_index else kwargs.get("weight")
        return _numel(args[0]) * (with_affine if weight is not None else without_affine)

    return formula


def _batch_norm_with_training_flag_at(training_index: int) -> FlopFormula:
    """Inference batch norm is a per-channel scale and shift (fvcore: 2 / 1); training is a full norm."""

    def formula(args: tuple, kwargs: dict, out: Any) -> int:
        training = bool(args[training_index]) if len(args) > training_index else bool(kwargs.get("training"))
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if training:
            return _numel(args[0]) * (5 if weight is not None else 4)
        return _numel(args[0]) * (2 if weight is not None else 1)

    return formula


def _per_output_element(scale: int) -> FlopFormula:
    def formula(args: tuple, kwargs: dict, out: Any) -> int:
        return scale * _numel(_first_output(out))

    return formula


def _per_input_element(scale: int) -> FlopFormula:
    def formula(args: tuple, kwargs: dict, out: Any) -> int:
        return scale * _numel(args[0])

    return formula


def _build_table() -> dict[Any, FlopFormula]:
    table: dict[Any, FlopFormula] = {
        aten.mm: _mm,
        aten.addmm: _addmm,
        aten.bmm: _bmm,
        aten.baddbmm: _baddbmm,
        aten.convolution: _convolution,
        aten._convolution: _convolution,
        aten.grid_sampler_2d: _per_output_element(4),
        aten.grid_sampler: _per_output_element(4),
        # native_group_norm(input, weight, bias, N, C, HxW, group, eps)
        aten.native_group_norm: _norm_with_affine_at(1, 5, 4),
        # native_layer_norm(input, normalized_shape, weight, bias, eps)
        aten.native_layer_norm: _norm_with_affine_at(2, 5, 4),
        # native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
        aten.native_batch_norm: _batch_norm_with_training_flag_at(5),
        aten._native_batch_norm_legit: _batch_norm_with_training_flag_at(5),
        aten.cudnn_batch_norm: _batch_norm_with_training_flag_at(5),
        # _native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)
        aten._native_batch_norm_legit_no_training: _norm_with_affine_at(1, 2, 1),
        aten.upsample_bilinear2d: _per_output_element(4),
        aten.upsample_nearest2d: _per_output_element(1),
        aten._adaptive_avg_pool2d: _per_input_element(1),
        aten.adaptive_avg_pool2d: _per_input_element(1),
    }
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    ):
        if hasattr(aten, name):
            table[getattr(aten, name)] = _sdpa
    return table


FLOP_FORMULAS: dict[Any, FlopFormula] = _build_table()


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Flops of one dispatched ATen call (an ``OpOverload``); 0 for operators not in the table."""
    formula = FLOP_FORMULAS.get(func.overloadpacket)
    if formula is None:
        return 0
    return int(formula(args, kwargs, out))
