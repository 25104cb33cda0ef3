"""``scalar`` (after SCALAR, arXiv 2507.19946, sec. 3): for every scale k and every chosen block l an
unshared linear map P_{k,l} turns the control features of scale k into a residual added to the hidden states
of scale k entering block l: x <- x + P_{k,l}(F_k). Zero-initialised (ControlNet's zero convolution), so a
new branch leaves the VAR unchanged. ``blocks`` chooses the blocks (default all)."""

from __future__ import annotations

import torch
from torch import nn

from varctl.models.control.injectors.base import BlockInputSession, Injector


class ScalarInjector(Injector):
    name = "scalar"

    def __init__(self, config):
        super().__init__(config)
        n, K, Fd, C = len(config.injected_blocks), config.num_scales, config.feature_dim, config.embed_dim
        # weight (blocks, K, F, C), bias (blocks, K, C); zero: a new branch changes nothing
        self.proj_weight = nn.Parameter(torch.zeros(n, K, Fd, C))
        self.proj_bias = nn.Parameter(torch.zeros(n, K, C))

    def residual(self, session, j: int, begin: int, end: int) -> torch.Tensor:
        """P_{k,l}(F_k) of every scale k in [begin, end), the tokens entering block ``l`` (slot j)."""
        tokens_RLF, out = session.ctx.tokens_RLF, []
        for k in session.scales(begin, end):
            b, e = self.config.begin_ends[k]
            x = tokens_RLF[:, b:e]
            out.append(x @ self.proj_weight[j, k].to(x.dtype) + self.proj_bias[j, k].to(x.dtype))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def session(self, ctx):
        return BlockInputSession(self, ctx)
