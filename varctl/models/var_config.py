"""The VAR configuration: ``VARConfig`` (the official depth rule, presets, the invariants worth checking)
and the configuration of an official checkpoint read off its tensor shapes.

Legend: L all tokens, C width, D condition width, V vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from varctl.models.lifecycle import OFFICIAL_PATCH_NUMS, ModelConfig

CONDITIONS = ("class", "text")


@dataclass
class VARConfig(ModelConfig):
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

    # "d<N>" is any depth with the official width/heads rule (from_name)
    presets: ClassVar[dict[str, dict]] = {
        "tiny": {
            "depth": 2,
            "num_classes": 10,
            "vocab_size": 256,
            "z_channels": 16,
            "patch_nums": (1, 2, 3, 4),
        },
    }
    # training settings: no weight depends on them, so a loaded VAR may be fine-tuned with other values
    free_on_load: ClassVar[tuple[str, ...]] = (
        "cond_drop_rate",
        "drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
    )

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        # the invariants whose failure would surface later as a confusing reshape or lookup error
        self.require_positive("depth", "num_classes", "vocab_size", "z_channels", "embed_dim", "num_heads")
        self.require_positive("text_dim", "text_len", "text_pooled_dim")
        self.require_rate("cond_drop_rate", "drop_rate", "attn_drop_rate", "drop_path_rate")
        self.require(self.mlp_ratio > 0, "mlp_ratio", "positive")
        self.require(self.norm_eps > 0, "norm_eps", "positive")
        self.check_schedule()
        self.require(
            self.heads >= 1 and self.C % self.heads == 0, "num_heads", f"a divisor of width {self.C}"
        )
        self.require(self.condition in CONDITIONS, "condition", f"one of {CONDITIONS}")

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
            return cls.from_dict({"depth": int(match.group(1)), **overrides}, f"preset {name!r}")
        if name not in cls.presets:
            raise ValueError(
                f"unknown VAR preset {name!r}; known: 'd<depth>' (e.g. 'd16') and {sorted(cls.presets)}"
            )
        return super().from_name(name, **overrides)


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
