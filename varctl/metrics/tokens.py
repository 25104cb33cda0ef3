"""Teacher-forcing metrics of the VAR: token cross-entropy and accuracy, overall and per scale.

Legend: B batch, L all tokens.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ScaleMetrics(Metric):
    """Token cross-entropy and accuracy per scale, summed over batches and processes (mean per token)."""

    full_state_update = False

    def __init__(self, begin_ends: list[tuple[int, int]]):
        super().__init__()
        self.begin_ends = begin_ends
        K = len(begin_ends)
        self.add_state("loss_sum", torch.zeros(K, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(K, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(K, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss_BL: torch.Tensor, correct_BL: torch.Tensor) -> None:
        for k, (b, e) in enumerate(self.begin_ends):
            self.loss_sum[k] += loss_BL[:, b:e].double().sum()
            self.correct[k] += correct_BL[:, b:e].double().sum()
            self.count[k] += loss_BL[:, b:e].numel()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"loss": self.loss_sum.sum() / self.count.sum(), "acc": self.correct.sum() / self.count.sum()}
        for k in range(len(self.begin_ends)):
            out[f"loss_s{k}"] = self.loss_sum[k] / self.count[k]
            out[f"acc_s{k}"] = self.correct[k] / self.count[k]
        return {k: v.float() for k, v in out.items()}
