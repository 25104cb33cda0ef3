"""``scalar`` (after SCALAR, arXiv 2507.19946, sec. 3): for every scale k and every chosen block l an
unshared linear map P_{k,l} turns the control features of scale k into a residual added to the hidden states
of scale k entering block l: x <- x + P_{k,l}(F_k). Zero-initialised (ControlNet's zero convolution), so a
new branch leaves the VAR unchanged. ``blocks`` chooses the blocks (default all).

The maps are stored stacked, one (blocks, K, F, C) weight, and split into their (F, C) views once per call
(``ScalarSession``): indexing the stack once per (block, scale) would make autograd build a zero gradient of
the whole stack for each of them (at d16, 160 gradients of 168 MB each in one backward pass)."""

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
        weights, biases = session.maps()
        for k in session.scales(begin, end):
            b, e = self.config.begin_ends[k]
            x = tokens_RLF[:, b:e]
            out.append(x @ weights[j][k].to(x.dtype) + biases[j][k].to(x.dtype))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def session(self, ctx):
        return ScalarSession(self, ctx)


class ScalarSession(BlockInputSession):
    _maps = None

    def maps(self) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
        """The (F, C) weights and (C,) biases by [slot][scale], split off the stacks once per call (so the
        backward pass gathers their gradients into one stack gradient each)."""
        if self._maps is None:
            stacks = (self.injector.proj_weight, self.injector.proj_bias)
            self._maps = tuple([per.unbind(0) for per in p.unbind(0)] for p in stacks)
        return self._maps
