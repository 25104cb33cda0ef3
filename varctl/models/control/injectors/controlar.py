"""``controlar`` (after ControlAR, Li et al. 2024): the control features of each token are fused into the
image token at the same position, like a positional encoding, at the input of a few chosen blocks: x <- x +
W_l F (one zero-initialised linear map per chosen block, shared by all scales). ``blocks`` chooses the
blocks (default 0, depth / 3 and 2 depth / 3)."""

from __future__ import annotations

import torch
from torch import nn

from varctl.models.control.injectors.base import BlockInputSession, Injector


class ControlARInjector(Injector):
    name = "controlar"

    def __init__(self, config):
        super().__init__(config)
        self.fuse = nn.ModuleList(
            nn.Linear(config.feature_dim, config.embed_dim) for _ in config.injected_blocks
        )
        for lin in self.fuse:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def residual(self, session, j: int, begin: int, end: int) -> torch.Tensor:
        lin = self.fuse[j]
        return lin(session.features(begin, end).to(lin.weight.dtype))

    def session(self, ctx):
        return BlockInputSession(self, ctx)
