"""Checking a composed config against what its ``_target_`` classes accept, before anything is built.

Without this, a value of the wrong type fails deep inside the library that receives it (``trainer.max_steps=abc``
gave "'<' not supported between instances of 'str' and 'int'" from Lightning) and a key that the chosen class does
not take (``experiment=tiny data=coco_panoptic``: the tiny preset's ``data.num_train`` is a synthetic-data
parameter) gave "unexpected keyword argument". :func:`check_config` walks every node that has a ``_target_``,
reads the target's signature (following ``**kwargs`` up the class hierarchy, as the project's data modules
forward them) and raises one :class:`ConfigError` that names each bad key, its value and the expected type.

Only what the signature states plainly is checked (``int``, ``float``, ``bool``, ``str``, ``None``, ``Literal``,
unions of these); values for parameters annotated otherwise pass unchecked.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

# Top-level keys of the project's own (no ``_target_``), with the types they accept.
TOP_LEVEL_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int, type(None)),
    "num_threads": (int, type(None)),
    "steps": (int,),
}
_UNCHECKED = object()


class ConfigError(ValueError):
    """A config value of the wrong type or a key its target does not take; the message names the keys."""


def _locate(target: str) -> Callable | None:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:  # an unknown target is reported by instantiate itself, with Hydra's message
        return None


def _signature_parameters(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(parameters by name, type hints, open): for a class, its ``__init__`` and, while that forwards
    ``**kwargs``, its bases' ``__init__``; ``open`` is True when unknown keys may still be accepted."""
    functions = [target]
    if inspect.isclass(target):
        functions = [cls.__init__ for cls in target.__mro__ if "__init__" in vars(cls) and cls is not object]
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return parameters, hints, True
        try:
            hints = {**typing.get_type_hints(function), **hints}
        except Exception:  # unresolvable forward references: check names only
            pass
        own = {name: p for name, p in signature.parameters.items() if name != "self"}
        for name, parameter in own.items():
            if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
                parameters.setdefault(name, parameter)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return parameters, hints, False
        if not getattr(function, "__module__", "").startswith("proscale."):
            return parameters, hints, True  # a library's **kwargs may go anywhere (e.g. DDPStrategy -> DDP)
    return parameters, hints, True  # **kwargs reach object (or an unknown callee)


def _accepts(annotation: Any, value: Any) -> bool | object:
    """Whether ``value`` (a plain config value) fits ``annotation``; ``_UNCHECKED`` when the annotation is not
    one of the simple forms this module understands."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return _UNCHECKED
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(arm, value) for arm in typing.get_args(annotation)]
        if any(v is True for v in verdicts):
            return True
        return _UNCHECKED if any(v is _UNCHECKED for v in verdicts) else False
    if origin is typing.Literal:
        return value in typing.get_args(annotation) and not (
            isinstance(value, bool) and all(not isinstance(a, bool) for a in typing.get_args(annotation))
        )
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return _UNCHECKED


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    return text.replace("<class '", "").replace("'>", "")


def _nodes_with_target(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            if path == "" and key == "hydra":
                continue
            try:
                child = node._get_node(key)
            except Exception:
                continue
            yield from _nodes_with_target(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _nodes_with_target(node._get_node(index), f"{path}[{index}]")


def _value(node: DictConfig, key: str) -> Any:
    try:
        value = node[key]
    except Exception:  # an interpolation that cannot resolve here is reported where it is used
        return _UNCHECKED
    if isinstance(value, (DictConfig, ListConfig)):
        return _UNCHECKED
    return value


def _group_choice(path: str) -> str:
    """`` (data=coco_panoptic)`` for the node of a config group chosen on the command line or by a preset."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get(path)
    except Exception:
        return ""
    return f" ({path}={choice})" if choice else ""


def config_problems(cfg: DictConfig) -> list[str]:
    """Every type mismatch and unknown key, one line each."""
    problems = []
    for key, allowed in TOP_LEVEL_TYPES.items():
        value = _value(cfg, key) if key in cfg else _UNCHECKED
        if value is not _UNCHECKED and not isinstance(value, bool) and not isinstance(value, allowed):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            problems.append(f"{key}={value!r} ({type(value).__name__}): expected {expected}")
    for path, node in _nodes_with_target(cfg):
        target_name = node.get("_target_")
        target = _locate(str(target_name)) if isinstance(target_name, str) else None
        if target is None:
            continue
        builder_keys: set[str] = set()
        registry = getattr(target, "registry", None)  # build_encoder / build_backbone: check the part they build
        if registry is not None and isinstance(node.get("name"), str) and node.get("name") in registry:
            target, builder_keys = registry.get(node.get("name")), {"name"}
            target_name = f"{node.get('name')} ({getattr(target, '__qualname__', target)})"
        parameters, hints, open_ = _signature_parameters(target)
        unknown = [
            str(k) for k in node.keys() if not str(k).startswith("_") and str(k) not in parameters.keys() | builder_keys
        ]
        if unknown and not open_:
            where = path or "(root)"
            problems.append(
                f"{where}{_group_choice(path)}: {target_name} does not take {', '.join(unknown)} (keys set "
                f"by another config, e.g. an experiment preset written for other data?); it takes: {', '.join(parameters)}"
            )
        for key in node.keys():
            name = str(key)
            if name not in parameters:
                continue
            value = _value(node, name)
            if value is _UNCHECKED or value is None:  # null often means "filled in at run time" (num_classes)
                continue
            annotation = hints.get(name, parameters[name].annotation)
            if _accepts(annotation, value) is False:
                full_key = f"{path}.{name}" if path else name
                problems.append(
                    f"{full_key}={value!r} ({type(value).__name__}): expected {_describe(annotation)} "
                    f"(argument {name!r} of {target_name})"
                )
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every bad key of ``cfg`` (see the module docstring)."""
    problems = config_problems(cfg)
    if problems:
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{len(problems)} config {noun}:\n" + "\n".join(f"  - {line}" for line in problems))
