"""Callbacks the stages share: the predict image writer, the TensorBoard image grids, the divergence guard
and the preemption checkpoint."""

from varctl.callbacks.guard import NonFiniteGuard, PreemptionCheckpoint
from varctl.callbacks.images import ImageGrid, ImageLogger, control_pictures
from varctl.callbacks.writer import ImageWriter, save_png

__all__ = [
    "ImageGrid",
    "ImageLogger",
    "ImageWriter",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "control_pictures",
    "save_png",
]
