"""Callbacks the stages share: the predict image writer, the test results writer, the TensorBoard image
grids, the divergence guard, the preemption checkpoint, the random state of resumed runs and the progress
of a test run."""

from varctl.callbacks.evaluation import EvaluationWriter
from varctl.callbacks.guard import NonFiniteGuard, PreemptionCheckpoint
from varctl.callbacks.images import ImageGrid, ImageLogger, control_pictures
from varctl.callbacks.resume import ResumeRandomState
from varctl.callbacks.test_progress import TestProgress
from varctl.callbacks.writer import ImageWriter, save_png

__all__ = [
    "EvaluationWriter",
    "ImageGrid",
    "ImageLogger",
    "ImageWriter",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "ResumeRandomState",
    "TestProgress",
    "control_pictures",
    "save_png",
]
