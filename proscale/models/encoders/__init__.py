"""Encoder registry: ``ENCODERS.build(name, **kwargs)``; importing this package registers them all."""

from proscale.models.encoders import m2f  # noqa: F401  (registers "m2f")
from proscale.models.encoders.base import ENCODERS, MultiScaleEncoder
from proscale.models.encoders.m2f import M2FEncoder

__all__ = ["ENCODERS", "M2FEncoder", "MultiScaleEncoder"]
