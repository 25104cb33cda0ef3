"""One VAR's state inside one ``generate`` call (var_generate.py): what depends only on the condition
(modulations, the head's modulation, text keys and values, the control session), the KV caches, and the
three things the sampling loop asks of a model: run a scale through the blocks, mix the guided logits, and
embed the next scale's input. Keeping it apart from the loop lets a second model take over mid-call (a
small refiner for the last scales, after CoDe) and lets rows be dropped (guidance skipped at late scales).

Legend: R rows (the B samples and their guidance copies), l tokens of one scale, C width, Cv code width.
"""

from __future__ import annotations

import torch

from varctl.models.token_pruning import PruningPlan
from varctl.models.transformer import KVCache, PrefixKV, block_context, text_rows


class ScaleRunner:
    """``var`` sampling for the R rows of ``cond`` (the parts concatenated), with an optional control
    ``rows`` (``Controls.rows``) and token-pruning plan. Nothing is stored on ``var``."""

    def __init__(self, var, cond, B: int, rows=None, pruning: PruningPlan | None = None):
        c = self.config = var.config
        self.var, self.B, self.pruning = var, B, pruning
        self.cond_BD, text = var._embed_condition(cond, drop=False)
        self.R = self.cond_BD.shape[0]
        shared = var.shared_ada_lin(self.cond_BD)
        self.mods = [block.modulation(shared) for block in var.blocks]
        self.head_mod = var.head_nm.modulation(self.cond_BD)
        self.texts = [block_context(b, text) for b in var.blocks]
        self.session = None if rows is None else rows.session(var, shared, text, cached=True)
        self.lvl_pos = var._lvl_pos()
        self.caches = [KVCache(c.L) for _ in var.blocks]
        if self.session is not None and (prefix := self.session.prefix()) is not None:
            self.caches = self._prefix_caches(prefix)

    def _prefix_caches(self, prefix) -> list[KVCache]:
        """KV caches that start with a prefix's keys and values: the prefix passes through the blocks once,
        before the first scale (once per prefix row, each of the R rows then reading its row's)."""
        x, caches = prefix.x, []
        for block, mod, text in zip(self.var.blocks, self.mods, self.texts):
            if prefix.shared is not None:  # else each row's own condition, the modulations the scales use
                mod, text = block.modulation(prefix.shared), block_context(block, prefix.text)
            kv = PrefixKV()
            x = block(x, mod, None, cache=kv, text=text)
            k, v = (kv.k, kv.v) if prefix.index_R is None else (kv.k[prefix.index_R], kv.v[prefix.index_R])
            cache = KVCache(self.config.L + k.shape[2])
            cache.append(k, v)
            cache.consts = kv.consts
            caches.append(cache)
        return caches

    def start(self) -> torch.Tensor:
        """The first scale's input (R, first_l, C): the condition plus the start position."""
        return self.var._start_tokens(self.cond_BD, self.lvl_pos)

    def embed(self, si: int, next_BlCv: torch.Tensor) -> torch.Tensor:
        """Scale ``si``'s input (R, l, C) from the (B, l, Cv) code vectors of the running f_hat; every copy of
        a sample sees the same tokens."""
        begin, end = self.config.begin_ends[si]
        w = self.var.word_embed
        x_BlC = w(next_BlCv.to(w.weight.dtype)) + self.lvl_pos[:, begin:end]
        return x_BlC if self.R == self.B else torch.cat([x_BlC] * (self.R // self.B))

    def run(self, si: int, x_RlC: torch.Tensor) -> torch.Tensor:
        """The blocks over scale ``si`` (appending its keys and values to the caches) -> hidden states."""
        begin, end = self.config.begin_ends[si]
        bias = None if self.session is None else self.session.attention_bias(None, begin, end)
        prunes = [None if self.pruning is None else self.pruning.at(si, i) for i in range(len(self.caches))]
        if bias is not None and any(p is not None for p in prunes):
            raise ValueError(
                "token_pruning cannot be used with the prefill injector (the prefix's attention bias is per "
                "token, and pruning drops tokens)"
            )
        return self._blocks(x_RlC, bias, (begin, end), prunes)

    def _blocks(self, x, bias, span, prunes):
        session = self.session if span is not None else None
        for i, (block, mod, cache, text) in enumerate(
            zip(self.var.blocks, self.mods, self.caches, self.texts)
        ):
            if session is not None:
                x = session.block_input(i, x, *span)
            x = block(x, mod, bias, cache=cache, text=text, prune=None if prunes is None else prunes[i])
            if session is not None:
                x = session.block_output(i, x, *span)
        return x

    def prefill(self, inputs: list[torch.Tensor]) -> None:
        """Teacher-force the scales already drawn by another model (``inputs``: each scale's (R, l, C) input,
        smallest first) through the blocks with the block-causal mask, filling the KV caches (and the
        control session's: its injector acts on those scales as in teacher forcing)."""
        x = torch.cat(inputs, dim=1)  # (R, end, C)
        end = x.shape[1]
        mask = self.var.attn_bias_for_masking[:, :, :end, :end]
        if self.session is None:
            self._blocks(x, mask, None, None)
        else:
            self._blocks(x, self.session.attention_bias(mask, 0, end), (0, end), None)

    def logits(self, x_RlC: torch.Tensor, weights: list[float]) -> torch.Tensor:
        """The guided logits (B, l, V): sum_j w_j * logits of part j (``GenerateMixin._guided_logits``)."""
        return self.var._guided_logits(x_RlC, self.head_mod, self.B, weights)

    def keep_rows(self, n: int) -> None:
        """Only the first ``n`` rows (the samples, without their guidance copies) go on."""
        if self.session is not None:
            self.session.keep_rows(n)
        self.R = n
        self.cond_BD, self.head_mod = self.cond_BD[:n], self.head_mod[:n]
        self.mods = [m[:n] for m in self.mods]
        self.texts = [text_rows(t, n) for t in self.texts]
        for cache in self.caches:
            cache.keep_rows(n)
        if self.pruning is not None:
            self.pruning.keep_rows(n)


def check_refiner(var, refiner, draft_scales: int) -> None:
    """A refiner must draw the same token maps from the same condition as the drafter."""
    a, b = var.config, refiner.config
    same = ("patch_nums", "vocab_size", "z_channels", "condition", "num_classes")
    diff = [f"{k}: {getattr(a, k)!r} vs {getattr(b, k)!r}" for k in same if getattr(a, k) != getattr(b, k)]
    if diff:
        raise ValueError(f"refiner: it must match the drafting VAR ({'; '.join(diff)})")
    if not 1 <= draft_scales < a.num_scales:
        raise ValueError(
            f"draft_scales must be in [1, {a.num_scales - 1}] with a refiner, found {draft_scales}"
        )
