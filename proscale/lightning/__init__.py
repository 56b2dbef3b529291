"""Lightning glue: the LightningModule, optimizer/schedules, EMA and callbacks of the training framework."""

from proscale.lightning.module import NonFiniteLossError, SegmentationModule

__all__ = ["NonFiniteLossError", "SegmentationModule"]
