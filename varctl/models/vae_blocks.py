"""Convolutional encoder and decoder of the VQVAE (the latent-diffusion VQ-f16 design, as used by VAR).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022), appendix G; VAR
(Tian et al., 2024) keeps this autoencoder and only changes the quantiser. Attribute names reproduce the
official state_dict keys (``down.N.block.M``, ``mid.attn_1``, ``up.N.upsample.conv`` ...), so official
checkpoints load without conversion.

Legend: B batch, C channels, H W image or feature size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.kernels import DecoderConv2d, image_by_image

GROUPS = 32  # official GroupNorm groups; every channel count must be a multiple of the groups used
GN_EPS = 1e-6


def group_norm(channels: int, groups: int = GROUPS) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GN_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> (dropout) -> conv3x3, plus a (1x1 when needed) skip."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = GROUPS, conv=nn.Conv2d
    ):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU in place is safe: GroupNorm's backward needs its input, not its output. One statement per step,
        # so that at inference each intermediate is freed as soon as the next exists (3 maps alive, not 4)
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(self.dropout(h))
        skip = self.nin_shortcut(x)
        # in place into the conv's fresh output (its backward does not need it), where no dtype is promoted
        return h.add_(skip) if skip.dtype == h.dtype else skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v from one 1x1 conv (channels [q; k; v])."""

    def __init__(self, channels: int, groups: int = GROUPS):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # 3 x (B, C, HW)
        # explicit matmuls rather than SDPA: the official op order, so decoded images match it closely
        w = torch.bmm(q.transpose(1, 2), k).mul_(C**-0.5).softmax(dim=2)  # (B, HW query, HW key)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    """Zero-pad one pixel right and bottom, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, conv=nn.Conv2d):
        super().__init__()
        self.conv = conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, attention after each block (lowest resolution only), resampling."""

    def __init__(self, blocks: list[ResnetBlock], attention: bool, resample: nn.Module | None, name: str):
        super().__init__()
        channels = blocks[-1].conv2.out_channels
        self.block = nn.ModuleList(blocks)
        # present but empty without attention, as in the official layout
        groups = blocks[-1].norm2.num_groups
        attn = [AttnBlock(channels, groups) for _ in blocks] if attention else []
        self.attn = nn.ModuleList(attn)
        self.resample_name = None
        if resample is not None:
            self.add_module(name, resample)  # "downsample" or "upsample": the official key
            self.resample_name = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.resample_name is not None:
            h = getattr(self, self.resample_name)(h)
        return h


class MidBlock(nn.Module):
    """res -> attention -> res at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, groups: int = GROUPS, conv=nn.Conv2d):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups, conv)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups, conv)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, z_channels, H / 2^(levels-1), W / 2^(levels-1)) latent."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        groups: int = GROUPS,
    ):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, c_in = [], ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            blocks = [
                ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, groups) for j in range(num_res_blocks)
            ]
            last = i == n - 1
            levels.append(
                Level(
                    blocks, attention=last, resample=None if last else Downsample2x(c_out), name="downsample"
                )
            )
            c_in = c_out
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(c_in, dropout, groups)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """(B, z_channels, h, w) latent -> (B, 3, h * 2^(levels-1), w * 2^(levels-1)) image, not clamped.

    ``up[i]`` is indexed by level like the encoder's ``down[i]``: ``up[-1]`` (lowest resolution) runs first.
    Its 3x3 convolutions are ``DecoderConv2d``: Winograd on large CPU maps at inference (models/kernels.py).
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        groups: int = GROUPS,
    ):
        super().__init__()
        n, conv = len(ch_mult), DecoderConv2d
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = MidBlock(c_in, dropout, groups, conv)
        levels = [None] * n
        for i in reversed(
            range(n)
        ):  # built from the lowest resolution up: each level's input is the one below
            c_out = ch * ch_mult[i]
            blocks = [
                ResnetBlock(c_in if j == 0 else c_out, c_out, dropout, groups, conv)
                for j in range(num_res_blocks + 1)
            ]
            resample = Upsample2x(c_out, conv) if i else None
            levels[i] = Level(blocks, attention=i == n - 1, resample=resample, name="upsample")
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in, groups)
        self.conv_out = conv(c_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = 2 ** (len(self.up) - 1)
        if image_by_image(z, self.conv_in.weight, z.shape[-2] * z.shape[-1] * scale * scale):
            return torch.cat([self._decode(z[i : i + 1]) for i in range(len(z))])
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
