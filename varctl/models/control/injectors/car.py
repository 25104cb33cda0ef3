"""``car`` (after CAR, Yao et al. 2024): a side branch of copies of the backbone's first N blocks,
initialised from the backbone, is fed the block-0 input tokens plus the encoded control. The side outputs
enter the backbone blocks ``blocks`` (by default ``car_targets``: "last", the last N, one per side block as
in CAR, or "rest", every block after the N copied ones) through zero-initialised linear layers, scale by
scale: with M >= N receiving blocks, the m-th of them takes side block m * N // M (so one side block can
feed several backbone blocks). The side branch keeps its own KV caches while sampling. ``car_blocks`` is N
(default depth / 2).
While sampling, the side branch stops at the first scale from which the control strength is 0 throughout
(``control_strength``), so control on the early scales only costs less.

``car_condition="none"`` conditions the side blocks on the VAR's null condition (the null class or the empty
caption, and its start token) instead of each sample's: the side branch then depends on a row's tokens and
control only, which a sample and its class-guidance copy share, so it runs once for both (a control-dropped
copy for control guidance is a row of its own)."""

from __future__ import annotations

import torch
from torch import nn

from varctl.models.control.injectors.base import Injector, Session
from varctl.models.kernels import linear
from varctl.models.transformer import AdaLNBlock, KVCache, block_context, text_rows


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
        M = len(c.injected_blocks)  # the receiving backbone blocks (self.slot: block -> its index m)
        self.outs = nn.ModuleList(nn.Linear(C, C) for _ in range(M))
        for lin in self.outs:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.sources = [m * N // M for m in range(M)]  # the side block whose output the m-th one receives

    def init_from_backbone(self, var):
        for side, block in zip(self.blocks, var.blocks):
            side.load_state_dict(block.state_dict())

    def session(self, ctx):
        return CARSession(self, ctx)


class CARSession(Session):
    def __init__(self, injector, ctx):
        super().__init__(injector, ctx)
        inj, R = injector, ctx.tokens_RLF.shape[0]
        self.unconditioned = inj.config.car_condition == "none"
        self.reps = self.side_R = list(range(R))  # the row each side row is run for; each row's side row
        if self.unconditioned:  # one side row per sample and control: guidance copies share theirs
            self.reps, self.side_R = self.unconditioned_rows()
            shared, text, self.sos = self.null_condition(len(self.reps))
        else:
            shared, text = ctx.shared, ctx.text
        self._index_rows()
        self.mods = [b.modulation(shared) for b in inj.blocks]
        self.texts = [block_context(b, text) for b in inj.blocks]
        L = inj.config.L
        self.caches = [KVCache(L) for _ in inj.blocks] if ctx.cached else [None] * len(inj.blocks)
        self.outputs: list[torch.Tensor] = []
        readers: dict[int, list[int]] = {}  # side block -> the out layers that read it
        for m, j in enumerate(inj.sources):
            readers.setdefault(j, []).append(m)
        self.out_groups = []  # (side block, its out layers, their weights and biases stacked: one product)
        for j, ms in readers.items():
            layers = [inj.outs[m] for m in ms]
            if len(layers) == 1:
                self.out_groups.append((j, ms, layers[0].weight, layers[0].bias))
                continue
            weight, bias = torch.cat([lin.weight for lin in layers]), torch.cat([lin.bias for lin in layers])
            self.out_groups.append((j, ms, weight, bias))

    def _index_rows(self) -> None:
        """How the rows map to the side rows, once per call (the sampling loop uses it at every scale):
        ``copies`` k when the rows are k copies of the side rows in order (class guidance: the samples, then
        their guidance copies), so the side rows are the first U rows and the outputs add by broadcasting;
        else as index tensors ``reps_U`` (the rows the side rows are run for) and ``side_index_R`` (each
        row's side row). All None when every row is its own side row."""
        self.reps_U = self.side_index_R = self.copies = None
        U, R = len(self.reps), len(self.side_R)
        if U == R:
            return
        if self.reps == list(range(U)) and R % U == 0 and self.side_R == self.reps * (R // U):
            self.copies = R // U
        else:  # e.g. with control guidance: its control-dropped copies have side rows of their own
            device = self.ctx.tokens_RLF.device
            self.reps_U = torch.tensor(self.reps, device=device)
            self.side_index_R = torch.tensor(self.side_R, device=device)

    def keep_rows(self, n):
        super().keep_rows(n)
        # the first n rows' side rows are the first U: a side row is run for the first row that has it
        self.side_R = self.side_R[:n]
        U = max(self.side_R, default=-1) + 1
        self.reps = self.reps[:U]
        if not self.unconditioned:
            self.mods = [m[:U] for m in self.mods]
        self.texts = [text_rows(t, U) for t in self.texts]
        for cache in self.caches:
            cache.keep_rows(U)
        self._index_rows()

    def _side_input(self, x, begin, end):
        """The side branch's input tokens and control features (U, l, .): one row per side row; under the
        null condition the first scale's tokens are the null condition's."""
        f = self.features(begin, end)
        if not self.unconditioned:
            return x, f
        if self.copies is not None:
            x, f = x[: len(self.reps)], f[: len(self.reps)]
        elif self.reps_U is not None:
            x, f = x[self.reps_U], f[self.reps_U]
        if begin == 0:  # the first tokens hold the condition (the start token)
            first_l = self.sos.shape[1]
            sos = self.sos.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat((sos, x[:, first_l:]), dim=1)
        return x, f

    def block_input(self, i, x, begin, end):
        inj = self.injector
        if i == 0 and self.off_from(begin):  # switched off from here on: nothing to run or to cache
            self.outputs = []
        elif i == 0:  # run the side branch on this call's input tokens, once per scale
            mask = self.mask(begin, end)
            x_side, f = self._side_input(x, begin, end)
            fuse = inj.fuse_in
            h = x_side + linear(f.to(fuse.weight.dtype), fuse.weight, fuse.bias).to(x.dtype)
            hs = []
            for block, mod, cache, text in zip(inj.blocks, self.mods, self.caches, self.texts):
                h = block(h, mod, mask, cache=cache, text=text)
                hs.append(h)
            self.outputs = self._outputs(hs)
            if self.side_index_R is not None:  # back to every row
                self.outputs = [o[self.side_index_R] for o in self.outputs]
        m = inj.slot.get(i)
        if m is not None and self.outputs:
            r = self.scaled(self.outputs[m].to(x.dtype), begin, end)
            if self.copies is None:
                return x + r
            return (x.unflatten(0, (self.copies, -1)) + r).flatten(0, 1)  # every copy of the side rows
        return x

    def _outputs(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The receiving blocks' inputs from the side outputs ``hs``. The layers that read one side block run
        as one product: one side block feeding M blocks takes one C -> M * C matmul, not M of C -> C."""
        outs: list[torch.Tensor] = [None] * len(self.injector.outs)
        for j, ms, weight, bias in self.out_groups:
            y = linear(hs[j], weight, bias)
            outs_j = [y] if len(ms) == 1 else y.chunk(len(ms), dim=-1)
            for m, o in zip(ms, outs_j):
                outs[m] = o
        return outs
