"""``ecm`` (after ECM, arXiv 2510.05610): a lightweight adapter spread through the backbone. After each
chosen block an adapter of width A reads the hidden states and the control features of the same tokens,
mixes them with a context-aware attention over the tokens generated so far (block-causal, its own KV cache
while sampling), passes a gated FFN shared by all adapters, and adds the result back through a
zero-initialised projection. ``blocks`` chooses the blocks (default every second), ``adapter_dim`` is A.

ECM's training recipe, early-centric scale sampling, is the control stage's ``scale_sampling: early`` and its
inference recipe, a temperature schedule over scales, the sampler's per-scale ``temperature``; both work with
every injector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.control.injectors.base import Injector, Session
from varctl.models.transformer import KVCache, attention


class Adapter(nn.Module):
    """One site: down (C -> A) + control (F -> A), attention over the tokens so far, up (A -> C, zero)."""

    def __init__(self, C: int, Fd: int, A: int, heads: int):
        super().__init__()
        self.heads = heads
        self.down = nn.Linear(C, A)
        self.control = nn.Linear(Fd, A)
        self.qkv = nn.Linear(A, 3 * A)
        self.attn_proj = nn.Linear(A, A)
        self.up = nn.Linear(A, C)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def attend(self, u: torch.Tensor, mask, cache: KVCache | None) -> torch.Tensor:
        R, n, A = u.shape
        q, k, v = self.qkv(u).view(R, n, 3, self.heads, A // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)
        return self.attn_proj(attention(q, k, v, mask).reshape(R, n, A))


class GatedFFN(nn.Module):
    """LN -> (a * sigmoid(g)) -> Linear, shared by all adapter sites."""

    def __init__(self, A: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(A)
        self.fc1 = nn.Linear(A, 2 * hidden)
        self.fc2 = nn.Linear(hidden, A)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        a, g = self.fc1(self.norm(u)).chunk(2, dim=-1)
        return self.fc2(F.gelu(a, approximate="tanh") * torch.sigmoid(g))


class ECMInjector(Injector):
    name = "ecm"

    def __init__(self, config):
        super().__init__(config)
        C, Fd, A = config.embed_dim, config.feature_dim, config.adapter_dim
        heads = max(1, A // 32) if A % 32 == 0 else 1
        self.adapters = nn.ModuleList(Adapter(C, Fd, A, heads) for _ in config.injected_blocks)
        self.ffn = GatedFFN(A, 2 * A)

    def session(self, ctx):
        return ECMSession(self, ctx)


class ECMSession(Session):
    def __init__(self, injector, ctx):
        super().__init__(injector, ctx)
        L = injector.config.L
        self.caches = (
            [KVCache(L) for _ in injector.adapters] if ctx.cached else [None] * len(injector.adapters)
        )

    def keep_rows(self, n):
        super().keep_rows(n)
        for cache in self.caches:
            cache.keep_rows(n)

    def block_output(self, i, x, begin, end):
        j = self.injector.slot.get(i)
        if j is None or self.off_from(begin):  # the adapters' caches are read only by later scales
            return x
        ad = self.injector.adapters[j]
        dtype = ad.down.weight.dtype
        h = F.layer_norm(x.to(dtype), x.shape[-1:])
        u = ad.down(h) + ad.control(self.features(begin, end).to(dtype))
        mask = self.mask(begin, end)
        u = u + ad.attend(u, mask, self.caches[j])
        u = u + self.injector.ffn(u)
        return x + self.scaled(ad.up(u).to(x.dtype), begin, end)
