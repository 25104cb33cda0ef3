"""Reconstruction quality of the tokenizer: PSNR and SSIM (torchmetrics), LPIPS and codebook usage."""

from __future__ import annotations

from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from varctl.metrics.codebook import CodebookUsage


def reconstruction_metrics(num_scales: int, vocab_size: int) -> nn.ModuleDict:
    """Per-image PSNR and SSIM on [0, 1] averaged over images, the mean of per-image LPIPS distances, and
    the code counts of an epoch (``CodebookUsage``); every state is summed over processes."""
    return nn.ModuleDict(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            "lpips": MeanMetric(),
            "codebook": CodebookUsage(num_scales, vocab_size),
        }
    )
