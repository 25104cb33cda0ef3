"""``car`` (after CAR, Yao et al. 2024): a side branch of copies of the backbone's first N blocks,
initialised from the backbone, is fed the block-0 input tokens plus the encoded control. The output of side
block j enters backbone block depth - N + j (the later blocks) through a zero-initialised linear layer, scale
by scale; the side branch keeps its own KV caches while sampling. ``car_blocks`` is N (default depth / 2).
While sampling, the side branch stops at the first scale from which the control strength is 0 throughout
(``control_strength``), so control on the early scales only costs less."""

from __future__ import annotations

import torch
from torch import nn

from varctl.models.control.injectors.base import Injector, Session
from varctl.models.transformer import AdaLNBlock, KVCache, text_rows


class CARInjector(Injector):
    name = "car"

    def __init__(self, config):
        super().__init__(config)
        c, C, N = config, config.embed_dim, config.side_blocks
        self.fuse_in = nn.Linear(c.feature_dim, C)
        nn.init.trunc_normal_(self.fuse_in.weight, std=0.02)
        nn.init.zeros_(self.fuse_in.bias)
        self.blocks = nn.ModuleList(
            AdaLNBlock(C, c.cond_dim, c.num_heads, mlp_ratio=c.mlp_ratio, norm_eps=c.norm_eps,
                       shared_aln=c.shared_aln, attn_l2_norm=c.attn_l2_norm, cross_attn=c.text)
            for _ in range(N)
        )  # fmt: skip
        self.outs = nn.ModuleList(nn.Linear(C, C) for _ in range(N))
        for lin in self.outs:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.first_target = c.depth - N  # side block j feeds backbone block first_target + j

    def init_from_backbone(self, var):
        for side, block in zip(self.blocks, var.blocks):
            side.load_state_dict(block.state_dict())

    def session(self, ctx):
        return CARSession(self, ctx)


class CARSession(Session):
    def __init__(self, injector, ctx):
        super().__init__(injector, ctx)
        inj = injector
        self.mods = [b.modulation(ctx.shared) for b in inj.blocks]
        text = ctx.text
        self.texts = [
            None if text is None else (b.cross_attn.context(text[0]), *text[1:]) for b in inj.blocks
        ]
        L = inj.config.L
        self.caches = [KVCache(L) for _ in inj.blocks] if ctx.cached else [None] * len(inj.blocks)
        self.outputs: list[torch.Tensor] = []

    def keep_rows(self, n):
        super().keep_rows(n)
        self.mods = [m[:n] for m in self.mods]
        self.texts = [text_rows(t, n) for t in self.texts]
        for cache in self.caches:
            cache.keep_rows(n)

    def block_input(self, i, x, begin, end):
        inj = self.injector
        if i == 0 and self.off_from(begin):  # switched off from here on: nothing to run or to cache
            self.outputs = []
        elif i == 0:  # run the side branch on this call's input tokens, once per scale
            mask = self.mask(begin, end)
            f = self.features(begin, end)
            h = x + inj.fuse_in(f.to(inj.fuse_in.weight.dtype)).to(x.dtype)
            self.outputs = []
            for block, mod, cache, text, out in zip(inj.blocks, self.mods, self.caches, self.texts, inj.outs):
                h = block(h, mod, mask, cache=cache, text=text)
                self.outputs.append(out(h))
        j = i - inj.first_target
        if 0 <= j < len(self.outputs):
            x = x + self.scaled(self.outputs[j].to(x.dtype), begin, end)
        return x
