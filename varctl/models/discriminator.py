"""PatchGAN discriminator (Isola et al., 2017, pix2pix; the VQGAN variant of Esser et al., 2021).

A stack of 4x4 convolutions whose output is a grid of real/fake logits, one per overlapping image patch.
VQGAN uses BatchNorm; GroupNorm is used here so the logits of one image never depend on the rest of the
batch (real and fake halves, or the ranks of a DDP run, would otherwise mix their statistics).

Legend: B batch, C channels, H W image size, h w logit grid size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``layers`` stride-2 convolutions, then two stride-1 ones; returns logits (B, 1, h, w).

    Args:
        in_channels: image channels.
        channels: width of the first convolution; each further layer doubles it, up to 8x.
        layers: number of stride-2 downsamplings (3 gives the 70x70 receptive field of pix2pix).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PatchDiscriminator: layers must be >= 1, got {layers}")
        if channels < 1:
            raise ValueError(f"PatchDiscriminator: channels must be >= 1, got {channels}")
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c_in = channels
        for n in range(1, layers + 1):
            c_out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last widening conv keeps the size (pix2pix layout)
            blocks += [
                nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False),
                _norm(c_out),
                nn.LeakyReLU(0.2, True),
            ]
            c_in = c_out
        blocks.append(nn.Conv2d(c_in, 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # N(0, 0.02) convs and N(1, 0.02) norm gains: the DCGAN init that pix2pix and VQGAN use
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.main(x_BCHW)
