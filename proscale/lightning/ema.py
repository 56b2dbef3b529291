"""Exponential moving average of the model weights (optional; off in the paper's recipe).

The average lives outside the module tree, so checkpoints keep the raw weights under ``state_dict`` and the
average under a separate key; validation and testing temporarily swap the average in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ModelEMA:
    """Shadow copy ``ema = decay * ema + (1 - decay) * weights`` of every floating-point parameter and buffer.

    ``decay`` ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates (n = updates so far) so the
    average does not stay anchored to the random initialization of short runs.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.device != value.device:
                shadow = self.shadow[name] = shadow.to(value.device)
            if value.dtype.is_floating_point:
                shadow.lerp_(value.detach(), 1.0 - decay)
            else:
                shadow.copy_(value)
        self.num_updates += 1

    def swap_in(self, model: nn.Module) -> dict[str, Tensor]:
        """Load the averaged weights into ``model``; returns the raw weights for :meth:`swap_out`."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        return raw

    @staticmethod
    def swap_out(model: nn.Module, raw: dict[str, Tensor]) -> None:
        model.load_state_dict(raw)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not fit the model; mismatching keys: {sorted(missing)[:20]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
