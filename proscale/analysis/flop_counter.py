"""Count flops of any call by intercepting ATen operators, attributed to the ``nn.Module`` that ran them.

:class:`FlopCounter` is a ``TorchDispatchMode``: every operator below autograd passes through it and is
priced by :mod:`proscale.analysis.flop_formulas` (fvcore conventions). Module forward hooks keep a stack of
the qualified module names currently running, so each operator's flops are added to every enclosing module
(inclusive totals, like fvcore's ``by_module``).

:func:`count_call_flops` runs a call on meta tensors by default: the module's parameters and buffers are
swapped for meta copies (``torch.func.functional_call``), nothing is allocated or computed, and only
shapes flow, so a full Mask2Former at 800x1088 is counted in about a second. Forward passes with
data-dependent operators (``.item()``, ``nonzero``, boolean indexing) cannot run on meta; pass
``device="cpu"`` to count them on real tensors instead (same numbers, real compute time).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from proscale.analysis.flop_formulas import op_flops

TOTAL = ""  # key of the grand total in ``FlopCount.by_module`` (the root module's name is "" too)


@dataclass
class FlopCount:
    """Result of one counted call.

    Attributes:
        by_module: inclusive flops per qualified module name (``named_modules`` names); ``""`` is the whole call.
        by_operator: flops per ATen operator name (e.g. ``"aten.convolution"``), whole call.
        output: what the call returned (meta tensors when counted on meta).
    """

    by_module: Counter = field(default_factory=Counter)
    by_operator: Counter = field(default_factory=Counter)
    output: Any = None

    @property
    def total(self) -> int:
        return self.by_module[TOTAL]


class FlopCounter(TorchDispatchMode):
    """Dispatch mode that prices every ATen call and records it under the running modules.

    Use :meth:`track` to name the modules of a model; calls outside any tracked module only reach the total.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = FlopCount()
        self._names: dict[int, str] = {}
        self._stack: list[str] = []

    @contextlib.contextmanager
    def track(self, model: nn.Module) -> Iterator[FlopCounter]:
        """Attribute flops to ``model``'s submodules (by qualified name) while the context is open."""
        for name, module in model.named_modules(remove_duplicate=False):
            self._names.setdefault(id(module), name)
        pre = nn.modules.module.register_module_forward_pre_hook(self._enter)
        post = nn.modules.module.register_module_forward_hook(self._exit, always_call=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()

    def _enter(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None and name != TOTAL:
            self._stack.append(name)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self._names.get(id(module))
        if name is not None and name != TOTAL and self._stack and self._stack[-1] == name:
            self._stack.pop()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = _meta_shortcut(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        flops = op_flops(func, args, kwargs, out)
        if flops:
            self.count.by_operator[str(func.overloadpacket)] += flops
            self.count.by_module[TOTAL] += flops
            for name in set(self._stack):  # a set: a module re-entered inside itself counts once
                self.count.by_module[name] += flops
        return out


aten = torch.ops.aten

# Output shapes of operators whose meta implementation is a slow Python decomposition (grid_sampler_2d,
# upsample and addmm are decomposed op by op on meta): on meta inputs the counter answers them directly,
# which makes a full Mask2Former count ~5x faster. Outputs are contiguous, as the real kernels' are.
_META_OUTPUT_SHAPES: dict[Any, Callable[..., tuple[int, ...]]] = {
    aten.mm.default: lambda a, b: (a.shape[0], b.shape[1]),
    aten.addmm.default: lambda bias, a, b, **_: (a.shape[0], b.shape[1]),
    aten.bmm.default: lambda a, b: (a.shape[0], a.shape[1], b.shape[2]),
    aten.baddbmm.default: lambda base, a, b, **_: (a.shape[0], a.shape[1], b.shape[2]),
    aten.grid_sampler_2d.default: lambda x, grid, *_: (x.shape[0], x.shape[1], grid.shape[1], grid.shape[2]),
    aten.upsample_bilinear2d.default: lambda x, size, *_, **__: (x.shape[0], x.shape[1], *size),
    aten.upsample_nearest2d.default: lambda x, size, *_, **__: (x.shape[0], x.shape[1], *size),
}


def _meta_shortcut(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An empty meta output for :data:`_META_OUTPUT_SHAPES` operators on plain meta tensors, else None."""
    shape_of = _META_OUTPUT_SHAPES.get(func)
    if shape_of is None:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(type(t) is not torch.Tensor or not t.is_meta for t in tensors):
        return None
    dtype = tensors[-1].dtype if func in (aten.addmm.default, aten.baddbmm.default) else tensors[0].dtype
    return torch.empty(shape_of(*args, **kwargs), dtype=dtype, device="meta")


def _to_meta(value: Any) -> Any:
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, value)


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Meta copies of every parameter and buffer, keyed as ``functional_call`` expects."""
    state = {name: p.to("meta") for name, p in module.named_parameters(remove_duplicate=False)}
    state.update({name: b.to("meta") for name, b in module.named_buffers(remove_duplicate=False)})
    return state


def _is_on_meta(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


@contextlib.contextmanager
def deformable_attention_as_grid_sample(module: nn.Module) -> Iterator[None]:
    """Run every ``MSDeformAttn`` of ``module`` with the reference ``grid_sample`` kernel while open.

    The paper's convention prices deformable sampling as ``grid_sampler`` (4 per sampled element). The
    project's default kernel computes the same function with weighted gathers, which no convention counts,
    so counting always switches to the reference kernel: GFLOPs do not depend on the kernel that runs.
    """
    from proscale.models.ops.ms_deform_attn import MSDeformAttn, get_default_impl, set_default_impl

    previous_default = get_default_impl()
    explicit = {m: m.impl for m in module.modules() if isinstance(m, MSDeformAttn) and m.impl}
    set_default_impl("grid_sample")
    for attention in explicit:
        attention.impl = None
    try:
        yield
    finally:
        set_default_impl(previous_default)
        for attention, impl in explicit.items():
            attention.impl = impl


def count_call_flops(
    module: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    call: Callable[..., Any] | None = None,
    device: str = "meta",
) -> FlopCount:
    """Count the flops of ``call(*args, **kwargs)`` (default: ``module(*args, **kwargs)``), by submodule.

    Runs in eval mode under ``torch.no_grad()`` and restores the module's training flags afterwards.

    Args:
        module: the model whose submodules get the flops (names from ``named_modules``).
        args, kwargs: the call's inputs; tensors are moved to meta when ``device == "meta"``.
        call: what to run instead of ``module.__call__`` (it must use ``module`` internally).
        device: ``"meta"`` (shapes only, fast) or ``"real"`` to run on the inputs as given.

    Returns:
        :class:`FlopCount` with inclusive per-module totals.

    Raises:
        ValueError: on an unknown ``device``, or when the forward needs real data on meta (the message says
            to use ``device="real"``).
    """
    if device not in ("meta", "real"):
        raise ValueError(f"count_call_flops: device must be 'meta' or 'real', got {device!r}")
    kwargs = kwargs or {}
    run = call if call is not None else module
    training = {m: m.training for m in module.modules()}
    module.eval()
    counter = FlopCounter()
    try:
        with torch.no_grad(), counter.track(module), deformable_attention_as_grid_sample(module):
            if device == "real":
                with counter:
                    output = run(*args, **kwargs)
            else:
                # The module's own tensors are swapped for meta copies for the duration of the call (what
                # torch.func.functional_call does, but around an arbitrary ``call``).
                state = {} if _is_on_meta(module) else _meta_state(module)
                with (
                    torch.nn.utils.stateless._reparametrize_module(module, state),
                    counter,
                ):
                    output = run(*_to_meta(args), **_to_meta(kwargs))
    except (NotImplementedError, RuntimeError) as error:
        if device == "meta" and "meta" in str(error).lower():
            raise ValueError(
                "count_call_flops: the forward pass needs real data (a data-dependent operator ran on meta "
                f"tensors: {error}); count it with device='real'"
            ) from error
        raise
    finally:
        for m, flag in training.items():
            m.training = flag
    counter.count.output = output
    return counter.count
