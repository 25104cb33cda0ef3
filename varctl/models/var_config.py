"""The VAR configuration and its text condition: ``VARConfig`` (official depth rule, presets, checks),
``TextCondition`` (a frozen text encoder's output) and the configuration of an official checkpoint read off
its tensor shapes.

Legend: B batch, L all tokens, l tokens of one scale, C width, D condition width, V vocabulary,
T text tokens, E text embedding width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.scale_config import ScaleConfig

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 256 px
CONDITIONS = ("class", "text")
PRESETS = {  # "d<N>" is any depth with the official width/heads rule
    "tiny": {"depth": 2, "num_classes": 10, "vocab_size": 256, "z_channels": 16, "patch_nums": (1, 2, 3, 4)},
}


@dataclass
class VARConfig(ScaleConfig):
    """Hyper-parameters of VAR; defaults are the official VAR-d16. Width and heads follow depth (64*depth,
    depth) unless given; ``drop_path_rate`` None means 0.1 * depth / 24 as the official build."""

    depth: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae of the VQVAE
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True
    condition: str = "class"  # "class" or "text"
    text_dim: int = 512  # width of the text encoder's token embeddings
    text_len: int = 77  # max text tokens
    text_pooled_dim: int | None = None  # width of the pooled text embedding; None: text_dim

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        checks = [
            (self.depth >= 1, "depth", ">= 1", self.depth),
            (self.num_classes >= 1, "num_classes", ">= 1", self.num_classes),
            (self.vocab_size >= 1, "vocab_size", ">= 1", self.vocab_size),
            (self.z_channels >= 1, "z_channels", ">= 1", self.z_channels),
            *self.schedule_checks(),
            (self.C >= 1, "embed_dim", ">= 1", self.embed_dim),
            (
                self.heads >= 1 and self.C % self.heads == 0,
                "num_heads",
                f"a divisor of width {self.C}",
                self.heads,
            ),
            (self.mlp_ratio > 0, "mlp_ratio", "> 0", self.mlp_ratio),
            (0 <= self.drop_rate < 1, "drop_rate", "in [0, 1)", self.drop_rate),
            (0 <= self.attn_drop_rate < 1, "attn_drop_rate", "in [0, 1)", self.attn_drop_rate),
            (0 <= self.drop_path < 1, "drop_path_rate", "in [0, 1) or None", self.drop_path_rate),
            (self.norm_eps > 0, "norm_eps", "> 0", self.norm_eps),
            (0 <= self.cond_drop_rate <= 1, "cond_drop_rate", "in [0, 1]", self.cond_drop_rate),
            (self.condition in CONDITIONS, "condition", f"one of {CONDITIONS}", self.condition),
            (self.text_dim >= 1, "text_dim", ">= 1", self.text_dim),
            (self.text_len >= 1, "text_len", ">= 1", self.text_len),
            (self.pooled_dim >= 1, "text_pooled_dim", ">= 1 or None", self.text_pooled_dim),
        ]
        self.raise_failed(checks)

    @property
    def C(self) -> int:
        return self.embed_dim if self.embed_dim is not None else 64 * self.depth

    @property
    def D(self) -> int:
        return self.C

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def drop_path(self) -> float:
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    @property
    def pooled_dim(self) -> int:
        return self.text_pooled_dim if self.text_pooled_dim is not None else self.text_dim

    @classmethod
    def from_name(cls, name: str, **overrides) -> VARConfig:
        """``"d16"``, ``"d20"``, ``"d24"``, ``"d30"``, any ``"d<N>"`` (official depth rule) or ``"tiny"``."""
        match = re.fullmatch(r"d(\d+)", name)
        if match:
            return cls(**{"depth": int(match.group(1)), **overrides})
        if name not in PRESETS:
            raise ValueError(
                f"unknown VAR preset {name!r}; known: 'd<depth>' (e.g. 'd16') and {sorted(PRESETS)}"
            )
        return cls(**{**PRESETS[name], **overrides})


class TextCondition(NamedTuple):
    """A text condition from a frozen encoder: pooled (B, E), tokens (B, T, E), mask (B, T) (True: real)."""

    pooled_BE: torch.Tensor
    tokens_BTE: torch.Tensor
    mask_BT: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.pooled_BE.shape[0]

    def to(self, device: torch.device) -> TextCondition:
        return TextCondition(*(t.to(device) for t in self))

    def padded(self, T: int) -> TextCondition:
        """Tokens padded (masked out) to length T."""
        pad = T - self.tokens_BTE.shape[1]
        if pad <= 0:
            return self
        return TextCondition(
            self.pooled_BE,
            F.pad(self.tokens_BTE, (0, 0, 0, pad)),
            F.pad(self.mask_BT.bool(), (0, pad), value=False),
        )

    def expand(self, B: int) -> TextCondition:
        """A batch-1 condition repeated B times (views)."""
        p, t, m = self
        return TextCondition(p.expand(B, -1), t.expand(B, -1, -1), m.expand(B, -1))

    def cat(self, other: TextCondition) -> TextCondition:
        T = max(self.tokens_BTE.shape[1], other.tokens_BTE.shape[1])
        a, b = self.padded(T), other.padded(T)
        return TextCondition(*(torch.cat((x, y)) for x, y in zip(a, b)))

    def where(self, take_other_B: torch.Tensor, other: TextCondition) -> TextCondition:
        """Per sample: ``other`` where ``take_other_B`` else self (condition dropping)."""
        T = max(self.tokens_BTE.shape[1], other.tokens_BTE.shape[1])
        a, b = self.padded(T), other.padded(T)
        s = take_other_B
        return TextCondition(
            torch.where(s[:, None], b.pooled_BE, a.pooled_BE),
            torch.where(s[:, None, None], b.tokens_BTE, a.tokens_BTE),
            torch.where(s[:, None], b.mask_BT.bool(), a.mask_BT.bool()),
        )


def check_vae_fits(config: VARConfig, vae: nn.Module) -> None:
    """Raise if the VQVAE's vocabulary, code width or scale schedule differ from the VAR's."""
    pairs = [
        ("vocab_size", config.vocab_size, vae.vocab_size),
        ("z_channels", config.z_channels, vae.z_channels),
        ("patch_nums", config.patch_nums, tuple(vae.config.patch_nums)),
    ]
    bad = [f"{k}: VAR has {a}, VQVAE has {b}" for k, a, b in pairs if a != b]
    if bad:
        raise ValueError("the VQVAE does not fit this VAR (" + "; ".join(bad) + ")")


def config_from_state_dict(
    state_dict: dict, patch_nums: tuple[int, ...], source: str = "<state_dict>"
) -> VARConfig:
    """Read an official (class-conditional) VAR configuration off the tensor shapes."""
    need = ["pos_1LC", "word_embed.weight", "class_emb.weight", "lvl_embed.weight", "head.weight"]
    need.append("blocks.0.ffn.fc1.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise ValueError(f"{source}: not an official VAR state_dict (missing {missing})")
    patch_nums = tuple(int(p) for p in patch_nums)
    _, L, C = state_dict["pos_1LC"].shape
    K = state_dict["lvl_embed.weight"].shape[0]
    if L != sum(p * p for p in patch_nums) or K != len(patch_nums):
        raise ValueError(
            f"{source}: pos_1LC holds {L} tokens and lvl_embed {K} scales, "
            f"but patch_nums={patch_nums} give {sum(p * p for p in patch_nums)} tokens in {len(patch_nums)} "
            "scales; pass the patch_nums the model was trained with"
        )
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    l2_norm = "blocks.0.attn.scale_mul_1H11" in state_dict
    heads = state_dict["blocks.0.attn.scale_mul_1H11"].shape[1] if l2_norm else C // 64  # 64-wide heads
    return VARConfig(
        depth=depth,
        num_classes=state_dict["class_emb.weight"].shape[0] - 1,
        vocab_size=state_dict["head.weight"].shape[0],
        z_channels=state_dict["word_embed.weight"].shape[1],
        patch_nums=patch_nums,
        embed_dim=None if C == 64 * depth else C,
        num_heads=None if heads == depth else heads,
        mlp_ratio=state_dict["blocks.0.ffn.fc1.weight"].shape[0] / C,
        shared_aln="shared_ada_lin.1.weight" in state_dict,
        attn_l2_norm=l2_norm,
    )
