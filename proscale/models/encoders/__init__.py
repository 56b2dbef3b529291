"""Encoder registry: ``ENCODERS.build(name, **kwargs)``; importing this package registers them all."""

from proscale.models.encoders import lite_m2f, m2f, proscale, rt_m2f  # noqa: F401  (register the encoders)
from proscale.models.encoders.base import ENCODERS, MultiScaleEncoder
from proscale.models.encoders.lite_m2f import LiteM2FEncoder
from proscale.models.encoders.m2f import M2FEncoder
from proscale.models.encoders.proscale import ProScaleEncoder
from proscale.models.encoders.rt_m2f import RTM2FEncoder
from proscale.models.encoders.trc import TokenRecalibration

__all__ = [
    "ENCODERS",
    "LiteM2FEncoder",
    "M2FEncoder",
    "MultiScaleEncoder",
    "ProScaleEncoder",
    "RTM2FEncoder",
    "TokenRecalibration",
]
