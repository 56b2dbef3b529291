"""Key renaming by ordered regex rules, shared by the Hugging Face and detectron2 converters.

A rule is ``(pattern, replacement)``: the first pattern that matches a whole key decides; ``replacement``
is a ``re.sub`` template, a function of the match (for index arithmetic such as ``stage1 -> 0``), or
``None`` to drop the key (buffers the model rebuilds, loss weights).
Keys no rule matches pass through unchanged, so :func:`proscale.convert.load_into` reports them by name.

Separate q / k / v projections are fused into one ``qkv`` or ``in_proj`` tensor (rows q, then k, then v)
by rules whose replacement contains ``{qkv}``: the matched part name (group ``part``) picks the slot.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

Rule = tuple[str, str | Callable[[re.Match], str] | None]
QKV_ORDER = {"q": 0, "k": 1, "v": 2, "query": 0, "key": 1, "value": 2}


def apply_rules(state: Mapping[str, Tensor], rules: Sequence[Rule]) -> dict[str, Tensor]:
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if replacement is None:
                break
            if callable(replacement):
                out[replacement(match)] = value
            elif "{qkv}" in replacement:
                target = match.expand(replacement.replace("{qkv}", ""))
                fused.setdefault(target, {})[QKV_ORDER[match.group("part")]] = value
            else:
                out[match.expand(replacement)] = value
            break
        else:
            out[key] = value
    for target, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            names = [n for n, i in (("q", 0), ("k", 1), ("v", 2)) if i not in parts]
            raise ValueError(f"cannot fuse {target}: the {names} projection(s) are missing from the checkpoint")
        out[target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


__all__ = ["Rule", "apply_rules"]
