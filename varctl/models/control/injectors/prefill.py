"""``prefill``: the encoded control as a prefix of P = prefix_side^2 tokens that every scale attends to (the
simple baseline that a controlled ImageNet study, arXiv 2507.15724, found strong): the control features of
the scale of side prefix_side, projected to the VAR's width, plus a learned position. The prefix tokens run
through the backbone's blocks like the start token (they attend to each other); while sampling they fill the
KV caches once, before the first scale. A scale's control strength s multiplies its attention weight on the
prefix (a log s bias on the prefix keys; s = 0 ignores the prefix).

Unlike the residual injectors, a new prefix changes the VAR's outputs from the first step (attention to it
is not zero)."""

from __future__ import annotations

import math

import torch
from torch import nn

from varctl.models.control.injectors.base import Injector, Session


class PrefillInjector(Injector):
    name = "prefill"

    def __init__(self, config):
        super().__init__(config)
        self.side = config.prefix_grid
        self.scale = config.patch_nums.index(self.side)
        C = config.embed_dim
        self.proj = nn.Linear(config.feature_dim, C)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.pos = nn.Parameter(torch.empty(1, self.side**2, C))
        nn.init.trunc_normal_(self.pos, std=math.sqrt(1 / C / 3))

    @property
    def prefix_len(self) -> int:
        return self.side**2

    def session(self, ctx):
        return PrefillSession(self, ctx)


class PrefillSession(Session):
    def prefix(self):
        inj = self.injector
        tokens = self.features(*self.begin_ends[inj.scale])  # (R, P, F), the prefix scale's features
        return inj.proj(tokens.to(inj.proj.weight.dtype)) + inj.pos  # (R, P, C)

    def _log_strength(self, begin, end, like):
        s = self.strength(begin, end, like)
        return None if s is None else s.clamp_min(0).log()  # (1, l, 1), -inf where s = 0

    def attention_bias(self, mask, begin, end):
        """Teacher forcing (``mask`` the (1, 1, L, L) block-causal mask): the (1, 1, P + L, P + L) mask of
        prefix + tokens. Sampling (``mask`` None): the (1, 1, l, P + end) bias of one scale, or None."""
        P = self.injector.prefix_len
        if mask is not None:
            L = mask.shape[-1]
            full = mask.new_zeros(1, 1, P + L, P + L)
            full[..., :P, P:] = -torch.inf  # the prefix sees only itself
            full[..., P:, P:] = mask
            log_s = self._log_strength(0, L, mask)
            if log_s is not None:
                full[..., P:, :P] = log_s.view(1, 1, L, 1)
            return full
        log_s = self._log_strength(begin, end, self.ctx.tokens_RLF)
        if log_s is None:
            return None
        bias = log_s.new_zeros(1, 1, end - begin, P + end)
        bias[..., :P] = log_s.view(1, 1, -1, 1)
        return bias
