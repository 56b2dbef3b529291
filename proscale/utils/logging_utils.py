"""Rank-aware logging: under DDP only rank 0 prints, so logs are not duplicated per process."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


class _RankZeroAdapter(logging.LoggerAdapter):
    """Passes records through on rank 0 only (``rank_only=False`` in a call logs on every rank)."""

    def log(self, level: int, msg: object, *args, rank_only: bool = True, **kwargs) -> None:  # type: ignore[override]
        if not self.isEnabledFor(level):
            return
        rank = getattr(rank_zero_only, "rank", 0)
        if rank_only and rank != 0:
            return
        msg, kwargs = self.process(msg, kwargs)
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str = __name__) -> logging.LoggerAdapter:
    """A logger that only emits on global rank 0."""
    return _RankZeroAdapter(logging.getLogger(name), extra={})
