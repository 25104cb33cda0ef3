"""``prefill``: the encoded control as a prefix of P = prefix_side^2 tokens that every scale attends to (the
simple baseline that a controlled ImageNet study, arXiv 2507.15724, found strong): the control features of
the scale of side prefix_side, projected to the VAR's width, plus a learned position that a new branch
starts from the backbone's own (position and level embedding of that scale's tokens). The prefix tokens run
through the backbone's blocks on their own, attending only to each other, and every token attends to their
keys and values: in teacher forcing as while sampling, where they fill the KV caches once, before the first
scale. ``prefix_condition`` "none" runs them under the VAR's null condition instead of each sample's, once
for a sample and its class-guidance copy (half the prefix's cost when sampling with guidance). A scale's
control strength s multiplies its attention weight on the prefix (a log s bias on the prefix keys; s = 0
ignores the prefix).

Where to look: each head adds beta_h * overlap(i, j) to token i's attention logit on prefix token j, the
overlap being the fraction of token i's cell that prefix cell j covers (1 for the cell under a fine token,
1 / P everywhere for the 1x1 scale). beta (``prefix_locality``, learned per head, 0 for the plain baseline)
lets the backbone's L2-normalised attention, whose logits span only a few units, find the control under
each token: without it the prefix stayed unused on the demo (samples as close to other images' edges as to
their own, with the backbone frozen or fine-tuned for 600 steps).

Unlike the residual injectors, a new prefix changes the VAR's outputs from the first step (attention to it
is not zero)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from varctl.models.control.injectors.base import Injector, Prefix, Session


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
        self.locality = nn.Parameter(torch.full((1, config.num_heads, 1, 1), float(config.prefix_locality)))

    def init_from_backbone(self, var):
        begin, end = self.config.begin_ends[self.scale]
        with torch.no_grad():
            self.pos.copy_(var._lvl_pos()[:, begin:end])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "locality"
        if key not in state_dict:  # a branch saved before the locality bias: the plain prefix (beta 0)
            state_dict[key] = torch.zeros_like(self.locality)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @property
    def prefix_len(self) -> int:
        return self.side**2

    def session(self, ctx):
        return PrefillSession(self, ctx)


@functools.cache
@torch.inference_mode(False)  # cached: a first call under inference mode (sampling) must not break training
def overlap(patch_nums: tuple[int, ...], side: int) -> torch.Tensor:
    """(L, side^2): the fraction of each token's cell (scale by scale, row-major) covered by each cell of
    the side x side prefix grid; rows sum to 1."""

    def cover(n: int) -> torch.Tensor:  # (n, side): 1-D overlap of n equal cells with side equal cells
        edge = torch.arange(n + 1, dtype=torch.float64) / n
        grid = torch.arange(side + 1, dtype=torch.float64) / side
        lo = torch.maximum(edge[:-1, None], grid[None, :-1])
        hi = torch.minimum(edge[1:, None], grid[None, 1:])
        return (hi - lo).clamp_min(0) * n

    rows = [torch.einsum("ab,cd->acbd", cover(pn), cover(pn)).reshape(pn * pn, side**2) for pn in patch_nums]
    return torch.cat(rows).float()


class PrefillSession(Session):
    def prefix(self):
        """The prefix scale's control features, projected and placed, for each row; under
        ``prefix_condition`` "none" once per sample and control (a sample's guidance copy shares its
        prefix), conditioned on the VAR's null condition."""
        inj = self.injector
        features = self.features(*self.begin_ends[inj.scale])  # (R, P, F)
        shared = text = index_R = None  # each row's own condition
        if inj.config.prefix_condition == "none":
            reps, index = self.unconditioned_rows()
            shared, text, _ = self.null_condition(len(reps))
            if index != list(range(len(index))):
                features = features[reps]
                index_R = torch.tensor(index, device=features.device)
        x = inj.proj(features.to(inj.proj.weight.dtype)) + inj.pos  # (U, P, C)
        return Prefix(x, shared, text, index_R)

    def _prefix_bias(self, begin, end, like):
        """(1, H, l, P): tokens [begin, end)'s logit bias on the prefix: locality plus log strength."""
        inj = self.injector
        overlap_lP = overlap(inj.config.patch_nums, inj.side)[begin:end].to(like.device, like.dtype)
        bias = inj.locality.to(like.dtype) * overlap_lP  # (1, H, l, P)
        s = self.strength(begin, end, like)
        if s is not None:
            bias = bias + s.clamp_min(0).log().view(1, 1, -1, 1)  # -inf where s = 0
        return bias

    def attention_bias(self, mask, begin, end):
        """(1, H, l, P + end): the bias of tokens [begin, end) on the prefix and on tokens [0, end), ``mask``
        their block-causal mask on tokens [0, end) (None for one scale while sampling)."""
        P = self.injector.prefix_len
        H = self.injector.locality.shape[1]
        like = self.ctx.tokens_RLF if mask is None else mask
        bias = like.new_zeros(1, H, end - begin, P + end)
        bias[..., :P] = self._prefix_bias(begin, end, like)
        if mask is not None:
            bias[..., P:] = mask
        return bias
