"""Paths shared by the test files; the shared fixtures built from them are in conftest.py."""

from __future__ import annotations

import os

import torch

# the golden data of the official VAR code, with its provenance (tests/fixtures/reference/README.md)
REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "reference")
TINY = os.path.join(REFERENCE, "var_tiny")  # the tiny VQVAE and VAR with their golden tensors
PATCH_NUMS = (1, 2, 3, 4)  # the scale schedule of the tiny models (64 px)


def perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter (in place) so zero-initialised parts (cross-attention,
    control projections) matter in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module
