"""Callbacks the stages share: the predict image writer, the test results writer, the TensorBoard image
grids, the divergence guard, the preemption checkpoint and the random state of resumed runs."""

from varctl.callbacks.evaluation import EvaluationWriter
from varctl.callbacks.guard import NonFiniteGuard, PreemptionCheckpoint
from varctl.callbacks.images import ImageGrid, ImageLogger, control_pictures
from varctl.callbacks.resume import ResumeRandomState
from varctl.callbacks.writer import ImageWriter, save_png

__all__ = [
    "EvaluationWriter",
    "ImageGrid",
    "ImageLogger",
    "ImageWriter",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "ResumeRandomState",
    "control_pictures",
    "save_png",
]
