"""Control of VAR by control maps (edges, depth, segmentation, sketch): the branch (encoder + injector) and
the VAR with its branch. Files: config.py, encoders.py, branch.py, injectors/ (one file per injector)."""

from varctl.models.control.branch import ControlBranch, ControlledVAR, Controls
from varctl.models.control.config import (
    CAR_OWN_LAYOUT,
    ENCODERS,
    INJECTORS,
    MODALITIES,
    ControlConfig,
    shape_of,
)
from varctl.models.control.encoders import control_input

__all__ = [
    "CAR_OWN_LAYOUT",
    "ControlBranch",
    "ControlConfig",
    "ControlledVAR",
    "Controls",
    "ENCODERS",
    "INJECTORS",
    "MODALITIES",
    "control_input",
    "shape_of",
]
