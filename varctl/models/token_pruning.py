"""Cached token pruning for sampling (Guo et al., "FastVAR: Linear Visual Autoregressive Modeling via Cached
Token Pruning", 2025, sec. 3): an opt-in fast path of ``VAR.generate`` that changes its output on purpose.

Most of a sample's time goes to the last, largest scales, where most tokens change little. At those scales
each attention, cross-attention and FFN layer of the middle blocks runs on the "pivotal" tokens only: the
``1 - ratio`` share of the scale's tokens whose hidden state lies farthest from the scale's mean (the
high-frequency ones). The layer's output at the pruned positions is taken from the same layer's output at
the last unpruned scale (the reference), area-resized to the current map: the cache of the method's name.
The residual stream and the head keep every token, so every position still gets a sampled token; the KV
cache holds the pivotal tokens' keys only.

Legend: R rows (samples, and their guidance copies), l tokens of one scale, k kept tokens, C width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenPruning:
    """What to prune: ``ratio`` of the tokens at the last ``scales`` scales, in every block but the first and
    the last ``keep_blocks`` (FastVAR leaves the early and late layers whole; None: depth // 8, 2 at d16)."""

    ratio: float = 0.5
    scales: int = 2
    keep_blocks: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(
                f"token_pruning: ratio must be in [0, 1) (the share of tokens left out), found {self.ratio}"
            )
        if self.scales < 1 or (self.keep_blocks is not None and self.keep_blocks < 0):
            raise ValueError(
                f"token_pruning: scales >= 1 and keep_blocks >= 0 needed, found scales={self.scales}, "
                f"keep_blocks={self.keep_blocks}"
            )

    @classmethod
    def of(cls, value) -> TokenPruning | None:
        """``generate(token_pruning=...)``: a ratio, a dict of the fields, a TokenPruning; None or 0: off."""
        if value is None or isinstance(value, TokenPruning):
            return value if value is None or value.ratio > 0 else None
        if isinstance(value, dict):
            return cls.of(cls(**value))
        return cls.of(cls(ratio=float(value)))


class PruningPlan:
    """One ``generate`` call's pruning: which (scale, block) pairs prune, and the reference outputs."""

    def __init__(self, pruning: TokenPruning, patch_nums: tuple[int, ...], depth: int):
        K = len(patch_nums)
        if pruning.scales >= K:
            raise ValueError(
                f"token_pruning: scales={pruning.scales} leaves no unpruned scale for the reference "
                f"({K} scales)"
            )
        self.pruning, self.patch_nums = pruning, patch_nums
        self.reference_scale = K - pruning.scales - 1
        keep = depth // 8 if pruning.keep_blocks is None else pruning.keep_blocks
        self.blocks = range(keep, depth - keep)
        self.refs: dict[tuple[int, str], torch.Tensor] = {}  # (block, layer) -> (R, l_ref, C)

    def at(self, si: int, block: int) -> LayerPruning | None:
        """What block ``block`` does at scale ``si``: record the reference, prune, or nothing (None)."""
        if block not in self.blocks or si < self.reference_scale:
            return None
        return LayerPruning(self, si, block)

    def keep_rows(self, n: int) -> None:
        """Only the first ``n`` rows go on (the guidance copies were dropped)."""
        self.refs = {key: ref[:n] for key, ref in self.refs.items()}


class LayerPruning:
    """``prune(layer, x, name)`` for one block at one scale: ``layer(x)`` on all tokens (recording the
    reference) or on the pivotal ones (filling the rest from the reference)."""

    def __init__(self, plan: PruningPlan, si: int, block: int):
        self.plan, self.si, self.block = plan, si, block

    def __call__(self, layer, x_RlC: torch.Tensor, name: str) -> torch.Tensor:
        plan, key = self.plan, (self.block, name)
        if self.si == plan.reference_scale:
            out = layer(x_RlC)
            plan.refs[key] = out
            return out
        ref = plan.refs.get(key)
        if ref is None:  # the reference scale ran in another model (a drafter): nothing to fill from
            raise RuntimeError(
                "token_pruning: no reference outputs at scale "
                f"{plan.reference_scale}; with a refiner, draft_scales must be <= {plan.reference_scale}"
            )
        R, l, C = x_RlC.shape
        k = max(1, round(l * (1 - plan.pruning.ratio)))
        # pivotal tokens: farthest from the scale's mean hidden state (FastVAR's high-frequency criterion)
        score_Rl = (x_RlC - x_RlC.mean(dim=1, keepdim=True)).float().square().sum(dim=-1)
        idx_Rk = score_Rl.topk(k, dim=1).indices
        kept_RkC = layer(x_RlC.gather(1, idx_Rk.unsqueeze(-1).expand(-1, -1, C)))
        pn, pn_ref = plan.patch_nums[self.si], plan.patch_nums[plan.reference_scale]
        ref_RCpp = ref.transpose(1, 2).reshape(R, C, pn_ref, pn_ref)
        full_RlC = F.interpolate(ref_RCpp.float(), size=(pn, pn), mode="area").to(kept_RkC.dtype)
        full_RlC = full_RlC.flatten(2).transpose(1, 2).contiguous()  # (R, l, C)
        return full_RlC.scatter_(1, idx_Rk.unsqueeze(-1).expand(-1, -1, C), kept_RkC)
