"""Models: backbones, pixel decoder, transformer decoder and the Mask2Former that composes them."""

from proscale.models.backbones import BACKBONES, TimmBackbone, build_backbone
from proscale.models.mask2former import Mask2Former
from proscale.models.pixel_decoder import PixelDecoder, PixelDecoderOutput
from proscale.models.transformer_decoder import MaskedTransformerDecoder

__all__ = [
    "BACKBONES",
    "Mask2Former",
    "MaskedTransformerDecoder",
    "PixelDecoder",
    "PixelDecoderOutput",
    "TimmBackbone",
    "build_backbone",
]
