"""The multi-scale VQ tokenizer of VAR (Tian et al., "Visual Autoregressive Modeling", 2024, section 3.2).

A VQ-f16 autoencoder (vae_blocks.py) around a multi-scale residual quantiser (quantizer.py). The state_dict
equals the official ``vae_ch160v4096z32.pth`` key for key, so official files load with ``strict=True`` and
no conversion (``VQVAE.from_official``). Images are (B, 3, H, W) in [-1, 1].

Legend: B batch, C = Cvae latent channels, h w latent size, pn side of one scale, l = pn*pn tokens of one
scale, L all tokens, S scales, V vocabulary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from varctl.models.lifecycle import OFFICIAL_PATCH_NUMS, Model, ModelConfig
from varctl.models.quantizer import MultiScaleQuantizer
from varctl.models.vae_blocks import Decoder, Encoder

OFFICIAL_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 512 px (VAR-d36-512)


@dataclass
class VQVAEConfig(ModelConfig):
    """Hyper-parameters of the VQVAE; defaults are the official ``vae_ch160v4096z32`` tokenizer."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae, the code dimension
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25  # commitment loss weight
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4  # 0: one phi per scale, 1: one phi for all, K >= 2: K phi shared by ticks
    default_qresi_counts: int = 0  # number of phi when share_quant_resi=0 (0: one per scale)
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    using_znorm: bool = False  # cosine instead of L2 nearest neighbour
    quant_conv_ks: int = 3
    norm_groups: int = 32  # GroupNorm groups (official 32); fewer keep colour statistics in narrow CPU models

    presets: ClassVar[dict[str, dict]] = {
        "vae_ch160v4096z32": {},  # the official tokenizer, 256 px
        "vae_ch160v4096z32_512": {"patch_nums": OFFICIAL_512},  # same weights, 512 px schedule
        "tiny": {
            "vocab_size": 256,
            "z_channels": 16,
            "ch": 32,
            "patch_nums": (1, 2, 3, 4),
        },  # 64 px, reference
        # trainable on a CPU: 8x downsampling, 64 px
        "cpu_small": {
            "vocab_size": 512,
            "z_channels": 16,
            "ch": 32,
            "ch_mult": (1, 1, 2, 2),
            "num_res_blocks": 1,
            "norm_groups": 8,  # 32 groups of 1 channel would normalise away each image's colours
            "patch_nums": (1, 2, 3, 4, 6, 8),
        },
    }
    # no weight depends on these: a loaded tokenizer may be fine-tuned or used with another schedule
    free_on_load: ClassVar[tuple[str, ...]] = ("beta", "dropout", "patch_nums")

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        # the invariants whose failure would surface later as a confusing GroupNorm or shape error
        self.require_positive("vocab_size", "z_channels", "ch", "num_res_blocks", "norm_groups")
        self.require_positive("quant_conv_ks")
        self.require(min(self.ch_mult, default=1) >= 1, "ch_mult", "channel multipliers of at least 1")
        self.require_rate("dropout")
        self.require(self.beta >= 0, "beta", "at least 0")
        self.require(self.share_quant_resi >= 0, "share_quant_resi", "at least 0")
        self.require(self.default_qresi_counts >= 0, "default_qresi_counts", "at least 0")
        groups_fit = self.norm_groups >= 1 and self.ch % self.norm_groups == 0
        self.require(groups_fit, "ch", f"a multiple of norm_groups={self.norm_groups} (GroupNorm)")
        self.require(len(self.ch_mult) >= 1, "ch_mult", "non-empty (one entry per resolution level)")
        self.require(self.quant_conv_ks % 2 == 1, "quant_conv_ks", "odd (the latent keeps its size)")
        self.check_schedule()

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * self.downsample


class VQVAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, H, W), not clamped
    vq_loss: torch.Tensor  # scalar
    hits_SV: torch.Tensor  # float (S, V) code counts of this batch on this rank
    f_BChw: torch.Tensor  # continuous latent, detached, float32


class VQVAE(Model):
    """Multi-scale VQ tokenizer: image <-> token maps of sides ``config.patch_nums``."""

    kind = "vqvae"
    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = config = config or VQVAEConfig()
        blocks = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks)
        blocks["groups"] = config.norm_groups
        self.encoder = Encoder(**blocks, z_channels=config.z_channels, dropout=config.dropout)
        self.decoder = Decoder(**blocks, z_channels=config.z_channels, dropout=config.dropout)
        self.quantize = MultiScaleQuantizer(
            config.vocab_size,
            config.z_channels,
            config.patch_nums,
            beta=config.beta,
            quant_resi=config.quant_resi,
            share_quant_resi=config.share_quant_resi,
            default_qresi_counts=config.default_qresi_counts,
            using_znorm=config.using_znorm,
        )
        ks, C = config.quant_conv_ks, config.z_channels
        self.quant_conv = nn.Conv2d(C, C, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(C, C, ks, padding=ks // 2)
        self.init_weights()

    def init_weights(self) -> None:
        """Convs: torch's default (kaiming-uniform a=sqrt(5)), spelled out so a patched ``reset_parameters``
        cannot skip it; GroupNorm: identity; codebook: U(-1/V, 1/V) as in taming-transformers."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.weight[0].numel())
                    nn.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        V = self.config.vocab_size
        nn.init.uniform_(self.quantize.embedding.weight, -1 / V, 1 / V)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def z_channels(self) -> int:
        return self.config.z_channels

    # ---------------------------------------------------------------- image <-> latent
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> continuous latent f (B, C, H / downsample, W / downsample)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), found {tuple(images.shape)}")
        return self.quant_conv(self.encoder(images))

    def decode(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> image, not clamped (training)."""
        return self.decoder(self.post_quant_conv(f_hat_BChw))

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        return self.decode(f_hat_BChw).clamp_(-1, 1)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """Training pass: straight-through reconstruction, VQ loss and this batch's code hits."""
        f_BChw = self.encode(images)
        f_hat, vq_loss, hits_SV = self.quantize(f_BChw)
        return VQVAEOutput(self.decode(f_hat), vq_loss, hits_SV, f_BChw.detach().float())

    # ---------------------------------------------------------------- tokens
    @torch.no_grad()
    def img_to_idx(
        self, images: torch.Tensor, patch_nums: tuple[int, ...] | None = None
    ) -> list[torch.Tensor]:
        """Token indices per scale, smallest first, each (B, pn*pn) int64 in row-major order."""
        return self.quantize.f_to_idx_or_fhat(self.encode(images), to_fhat=False, patch_nums=patch_nums)

    def img_to_fhat(
        self, images: torch.Tensor, patch_nums: tuple[int, ...] | None = None
    ) -> list[torch.Tensor]:
        """Running quantised latent f_hat (B, C, h, w) after each scale."""
        return self.quantize.f_to_idx_or_fhat(self.encode(images), to_fhat=True, patch_nums=patch_nums)

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Running f_hat (B, C, h, w) after each scale; the schedule is read off the token counts."""
        return self.quantize.idx_to_fhat(idx_list, keep_all=True)

    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Tokens of all scales -> (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list, keep_all=False)[-1])

    def fhat_per_scale_to_img(self, fhat_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decode each running f_hat (one decoder call for all) -> list of (B, 3, H, W) in [-1, 1]."""
        B = fhat_list[0].shape[0]
        return list(self.fhat_to_img(torch.cat(list(fhat_list))).split(B))

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """VAR teacher-forcing input (B, L - first_l, C) float32."""
        return self.quantize.idx_to_var_input(idx_list)

    def ar_step(
        self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step of VAR.

        Args:
            si: scale index in ``config.patch_nums``.
            f_hat_BChw: f_hat before this scale (zeros (B, C, h, w) at si=0); not modified.
            h_BChw: (B, C, pn, pn) code vectors of the tokens sampled at scale si.
        Returns:
            (f_hat + phi(bicubic-upsampled h), next input: f_hat area-resized to the next scale, or f_hat
            itself at the last scale).
        """
        return self.quantize.ar_step(si, f_hat_BChw, h_BChw)

    # ---------------------------------------------------------------- files
    @classmethod
    def from_official(cls, source, patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS) -> VQVAE:
        """An official tokenizer (``vae_ch160v4096z32.pth``, a path or its state_dict) with the scale schedule
        ``patch_nums``, which official files do not store; ``load`` with ``patch_nums=`` reads every kind."""
        return cls.load(source, patch_nums=patch_nums)

    @classmethod
    def config_from_state_dict(cls, state_dict, source: str, patch_nums=None) -> VQVAEConfig:
        return config_from_state_dict(state_dict, patch_nums or OFFICIAL_PATCH_NUMS, source)


def config_from_state_dict(
    state_dict: dict, patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS, source: str = "<state_dict>"
) -> VQVAEConfig:
    """Read the architecture off the tensor shapes of an official-layout state_dict."""
    required = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv2.weight", "quantize.embedding.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"{source}: not a VQVAE state_dict, missing keys {missing}")
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    vocab_size, z_channels = state_dict["quantize.embedding.weight"].shape

    def indices(pattern: str) -> list[int]:
        rx = re.compile(pattern)
        return sorted({int(m.group(1)) for k in state_dict if (m := rx.match(k))})

    ch_mult = []
    for i in indices(r"encoder\.down\.(\d+)\."):
        out = state_dict[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]
        if out % ch:
            raise ValueError(f"{source}: encoder.down.{i} has {out} channels, not a multiple of ch={ch}")
        ch_mult.append(out // ch)
    phi = dict(quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0)
    if qresi_ls := indices(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight"):
        phi["share_quant_resi"] = len(qresi_ls)
    elif "quantize.quant_resi.qresi.weight" in state_dict:
        phi["share_quant_resi"] = 1
    elif per_scale := indices(r"quantize\.quant_resi\.(\d+)\.weight"):
        phi.update(share_quant_resi=0, default_qresi_counts=len(per_scale))
    else:
        phi["quant_resi"] = 0.0  # phi is the identity: no conv stored
    return VQVAEConfig(
        vocab_size=vocab_size,
        z_channels=z_channels,
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=len(indices(r"encoder\.down\.0\.block\.(\d+)\.")),
        patch_nums=tuple(patch_nums),
        quant_conv_ks=state_dict["quant_conv.weight"].shape[-1] if "quant_conv.weight" in state_dict else 3,
        **phi,
    )
