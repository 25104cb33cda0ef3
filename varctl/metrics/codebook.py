"""Codebook health of the multi-scale quantiser: per-scale usage, perplexity and dead codes.

All functions take code counts ``hits_SV`` (S scales, V codes): either one batch's counts or the
quantiser's EMA buffer ``ema_vocab_hit_SV``. Each row is judged against its own uniform rate row_sum / V,
so a scale with 1 token per image and one with 256 are comparable, and no batch or world size is needed
(the EMA of all-reduced counts sums to the global tokens per step). The official VAR trainer instead
compares every scale with the largest scale's rate, world * B*h*w / V * 0.08, which calls most codes of
the small scales unused; ``usage`` here with the default ``margin=0.08`` is its per-scale version.

Legend: S scales, V vocabulary.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def _uniform_rate_S1(hits_SV: torch.Tensor) -> torch.Tensor:
    return hits_SV.float().sum(1, keepdim=True) / hits_SV.shape[1]  # (S, 1)


def used_codes(hits_SV: torch.Tensor, margin: float = 0.08) -> torch.Tensor:
    """Bool (S, V): the code is hit at least ``margin`` times the uniform rate of its scale (and at all)."""
    hits_SV = hits_SV.float()
    return (hits_SV >= margin * _uniform_rate_S1(hits_SV)) & (hits_SV > 0)


def usage(hits_SV: torch.Tensor, margin: float = 0.08) -> torch.Tensor:
    """Percentage (S,) of the codebook that each scale uses (see ``used_codes``)."""
    return used_codes(hits_SV, margin).float().mean(1) * 100


def perplexity(hits_SV: torch.Tensor) -> torch.Tensor:
    """exp(entropy) (S,) of each scale's code distribution: V if uniform, 1 for one code, 0 without hits."""
    hits_SV = hits_SV.double()
    total_S1 = hits_SV.sum(1, keepdim=True)
    p_SV = hits_SV / total_S1.clamp_min(1e-30)
    entropy_S = -torch.where(p_SV > 0, p_SV * p_SV.log(), torch.zeros_like(p_SV)).sum(1)
    return torch.where(total_S1[:, 0] > 0, entropy_S.exp(), torch.zeros_like(entropy_S)).float()


def dead_codes(hits_SV: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool (S, V): the code is hit less than ``threshold`` times the uniform rate of its scale."""
    hits_SV = hits_SV.float()
    return hits_SV < threshold * _uniform_rate_S1(hits_SV)


def dead_everywhere(hits_SV: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool (V,): dead at every scale. The codebook is shared, so only these codes can be restarted safely."""
    return dead_codes(hits_SV, threshold).all(0)


def codebook_stats(
    ema_hits_SV: torch.Tensor, dead_threshold: float, margin: float = 0.08
) -> dict[str, torch.Tensor]:
    """0-d tensors (no device sync): ``usage/s{k}`` (%), ``perplexity/s{k}``, ``dead/s{k}``, ``dead/all``."""
    out: dict[str, torch.Tensor] = {}
    for name, values_S in (
        ("usage", usage(ema_hits_SV, margin)),
        ("perplexity", perplexity(ema_hits_SV)),
        ("dead", dead_codes(ema_hits_SV, dead_threshold).sum(1).float()),
    ):
        for si, v in enumerate(values_S.unbind()):
            out[f"{name}/s{si}"] = v
    out["dead/all"] = dead_everywhere(ema_hits_SV, dead_threshold).sum().float()
    return out


class CodebookUsage(Metric):
    """Code counts summed over an epoch and the ranks: per-scale share of codes hit at all, and perplexity."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_scales: int, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits_SV", default=torch.zeros(num_scales, vocab_size), dist_reduce_fx="sum")

    def update(self, hits_SV: torch.Tensor) -> None:
        if hits_SV.shape != self.hits_SV.shape:
            raise ValueError(
                f"CodebookUsage: hits_SV of shape {tuple(self.hits_SV.shape)} expected, "
                f"got {tuple(hits_SV.shape)}"
            )
        self.hits_SV += hits_SV.to(self.hits_SV)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"usage": (self.hits_SV > 0).float().mean(1) * 100, "perplexity": perplexity(self.hits_SV)}
