"""``model.compile_mode``: torch.compile for the VAR, off by default (on CPUs it mostly costs compile time).

``default`` and ``max-autotune`` compile each transformer block in place (``nn.Module.compile``: the
state_dict keys stay, FSDP2's per-block sharding stays outside the graphs), so teacher forcing and sampling
both run compiled blocks. ``reduce-overhead`` adds CUDA graphs, which replay one captured graph per call into
fixed output buffers: blocks that share one graph would overwrite each other's outputs, so that mode compiles
the whole teacher-forcing forward instead (training and validation loss; sampling stays eager).

The blocks share one code object, and dynamo guards every compiled variant on it: the drop-path rate (a
different constant in each block while training) and the sampler's per-scale shapes give more variants than
torch's default limit of 8, past which it silently runs eagerly. The limit is raised to cover them.
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def compile_var(var: nn.Module, mode: str) -> None:
    """Compile ``var`` (a VAR) in place for ``mode`` (module docstring)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile_mode={mode!r}: expected one of {COMPILE_MODES} or null")
    if mode == "reduce-overhead":
        var.compile(mode=mode)
        return
    config = torch._dynamo.config
    variants = (
        2 * len(var.blocks) + 2 * var.config.num_scales
    )  # drop-path rates; sampling shapes (+ KV lengths)
    config.recompile_limit = max(config.recompile_limit, variants)
    for block in var.blocks:
        block.compile(mode=None if mode == "default" else mode)
