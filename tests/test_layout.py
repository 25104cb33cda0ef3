"""The architecture's one-way dependencies: ``varctl.models`` needs torch only (no Lightning, Hydra,
omegaconf, torchvision or the datamodules), so the networks can be used in any training loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import importlib.abc, sys

BLOCKED = {"lightning", "hydra", "omegaconf", "torchvision", "datamodules", "open_clip"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"varctl.models imported {name}")

sys.meta_path.insert(0, Block())
from varctl.models import VAR, VQVAE, ControlBranch
from varctl.models.control import shape_of
from varctl.models.text import TextCondition, TextEncoder

var = VAR.build("tiny")
branch = ControlBranch.build({}, **shape_of(var.config, 64))
print(VQVAE.build("tiny").config.resolution, var.config.L, branch.config.resolution)
"""


def test_models_need_torch_only():
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["64", "30", "64"]
