"""Paths shared by the test files; the shared fixtures built from them are in conftest.py."""

from __future__ import annotations

import os

# the golden data of the official VAR code (README.md there); VARCTL_REFERENCE points elsewhere
REFERENCE = os.environ.get(
    "VARCTL_REFERENCE", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")
)
TINY = os.path.join(REFERENCE, "var_tiny")  # the tiny VQVAE and VAR with their golden tensors
PATCH_NUMS = (1, 2, 3, 4)  # the scale schedule of the tiny models (64 px)
