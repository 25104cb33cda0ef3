"""Reconstruction quality of the tokenizer: PSNR and SSIM (torchmetrics), LPIPS and codebook usage."""

from __future__ import annotations

from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from varctl.metrics.codebook import CodebookUsage


def reconstruction_metrics(num_scales: int, vocab_size: int) -> nn.ModuleDict:
    """Per-image PSNR and SSIM on [0, 1] averaged over images, the mean of per-image LPIPS distances, the
    code counts of an epoch (``CodebookUsage``) and the loss terms' means over images; every state is summed
    over processes (so processes with fewer images weigh less, as they should)."""
    return nn.ModuleDict(
        {
            "psnr": PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            "lpips": MeanMetric(),
            "codebook": CodebookUsage(num_scales, vocab_size),
            **{name: MeanMetric() for name in LOSS_TERMS},
        }
    )


LOSS_TERMS = ("recon_loss", "perceptual_loss", "vq_loss")  # the tokenizer's logged val/test losses
