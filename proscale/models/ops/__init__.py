"""Low-level ops shared by every encoder."""

from proscale.models.ops.ms_deform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["MSDeformAttn", "ms_deform_attn"]
