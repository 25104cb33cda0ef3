"""The control branch's configuration: its inputs, its encoder, its injector, and the backbone's shape.

Legend: C VAR width, D condition width, F control feature width, K scales.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from varctl.models.lifecycle import OFFICIAL_PATCH_NUMS, ModelConfig

MODALITIES = ("edges", "depth", "segmentation", "sketch")  # the control maps every part of varctl knows
INJECTORS = ("scalar", "controlar", "car", "prefill", "ecm")  # models/control/injectors/<name>.py
ENCODERS = ("conv", "pretrained")


@dataclass
class ControlConfig(ModelConfig):
    """The control branch of one VAR.

    Inputs and encoder: ``modalities`` (any of MODALITIES); ``encoder`` "conv" (a light convolutional encoder
    trained from scratch, the modalities concatenated as input channels) or "pretrained" (a frozen timm
    image encoder, ``encoder_name``, with the features of ``encoder_layers`` concatenated, and one light
    alignment layer per modality into a shared space, after SCALAR-Uni).

    Injector (``injector``, one of INJECTORS): how the encoded control enters the VAR. ``blocks``: the
    blocks that receive control (scalar: default all; controlar: default 0, depth/3, 2 depth/3; ecm: default
    every second block; car: ``car_targets``, at least N). ``car_blocks``: CAR's side branch copies the
    first N blocks (default depth / 2); ``car_targets``: the blocks its outputs enter unless ``blocks`` says,
    "last" (CAR: the last N, one per side block) or "rest" (every block after the N copied ones, each side
    block feeding an equal run of them through layers of their own);
    ``car_condition``: what its blocks are conditioned on, "class" (CAR: each sample's class or text) or
    "none" (no sample's: the VAR's null condition; the branch then reads only the tokens and the control, so
    a sample and its class-guidance copy share one pass, half its cost when sampling with guidance).
    ``prefix_side``: prefill's prefix is the control features of the scale of that side (default: the
    largest scale at most half the last); ``prefix_condition``: what the prefix tokens' pass through the
    blocks is conditioned on, "class" (each sample's) or "none" (the null condition: a sample and its
    class-guidance copy share the prefix's keys and values); ``prefix_locality``: the initial per-head
    bias of a token's attention on the prefix cells under it (0: the plain baseline). ``adapter_dim``:
    ECM's adapter width.

    Training (free on load): ``control_drop_rate`` replaces a sample's control by the null control (zero
    features) for control guidance; ``modality_drop_rate`` drops each modality of a sample independently.

    Backbone shape (from the VAR, ``shape_of``): depth, embed_dim, patch_nums, num_heads, cond_dim,
    mlp_ratio, norm_eps, shared_aln, attn_l2_norm, text; ``resolution`` from the tokenizer.
    """

    modalities: tuple[str, ...] = ("edges",)
    num_segments: int = 16  # segmentation ids 0..num_segments-1, one-hot encoded
    width: int = 32  # channels of the conv encoder's first stage, doubled at every downsampling
    feature_dim: int = 256  # F, the channels of the scale-independent feature map
    max_width: int = 256
    encoder: str = "conv"
    encoder_name: str = "vit_small_patch14_dinov2"  # timm model of encoder="pretrained"
    encoder_weights: str | None = None  # its weights: a local file (timm/HF format); "random": random (tests)
    encoder_layers: tuple[int, ...] = (-4, -1)  # block outputs concatenated as features
    encoder_input: int = 224  # side the maps are resized to for the pretrained encoder
    encoder_kwargs: dict[str, Any] | None = None  # extra timm.create_model arguments (e.g. a tiny test ViT)
    injector: str = "scalar"
    blocks: tuple[int, ...] | None = None
    car_blocks: int | None = None
    car_condition: str = "class"
    car_targets: str = "last"
    prefix_side: int | None = None
    prefix_condition: str = "class"
    prefix_locality: float = 4.0
    adapter_dim: int = 64
    control_drop_rate: float = 0.0
    modality_drop_rate: float = 0.0
    # the backbone's shape
    depth: int = 16  # blocks of the VAR
    embed_dim: int = 1024  # C, the VAR's width
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    resolution: int = 256  # side of the control maps (= the images)
    num_heads: int = 16
    cond_dim: int = 1024  # D
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    text: bool = False  # the VAR is text-conditioned (its blocks have cross-attention)

    # training settings and the block fields (which follow the VAR; weight shapes are checked on restore)
    free_on_load: ClassVar[tuple[str, ...]] = (
        "control_drop_rate",
        "modality_drop_rate",
        "encoder_weights",
        "num_heads",
        "cond_dim",
        "mlp_ratio",
        "norm_eps",
        "shared_aln",
        "attn_l2_norm",
        "text",
    )

    def __post_init__(self):
        self.modalities = tuple(str(m) for m in self.modalities)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        self.encoder_layers = tuple(int(i) for i in self.encoder_layers)
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
        # the invariants whose failure would surface later as a confusing lookup or shape error
        self.require_positive("num_segments", "width", "feature_dim", "max_width", "encoder_input")
        self.require_positive("adapter_dim", "depth", "embed_dim", "resolution", "num_heads", "cond_dim")
        self.require(self.mlp_ratio > 0, "mlp_ratio", "positive")
        known = len(self.modalities) == len(set(self.modalities)) >= 1 and set(self.modalities) <= set(
            MODALITIES
        )
        self.require(known, "modalities", f"a non-empty list of distinct modalities from {MODALITIES}")
        self.require(self.injector in INJECTORS, "injector", f"one of {INJECTORS}")
        self.require(self.encoder in ENCODERS, "encoder", f"one of {ENCODERS}")
        self.check_schedule()
        down = self.resolution / self.patch_nums[-1]
        fits = down >= 1 and down == int(down) and math.log2(down) == int(math.log2(down))
        self.require(fits, "resolution", f"the last scale ({self.patch_nums[-1]}) times a power of 2")
        if self.blocks is not None:
            ok = len(self.blocks) >= 1 and len(set(self.blocks)) == len(self.blocks)
            self.require(ok and all(0 <= b < self.depth for b in self.blocks), "blocks",
                         f"distinct block indices in [0, {self.depth})")  # fmt: skip
        if self.prefix_side is not None:
            self.require(
                self.prefix_side in self.patch_nums, "prefix_side", f"one of the scales {self.patch_nums}"
            )
        if self.car_blocks is not None:
            self.require(1 <= self.car_blocks <= self.depth, "car_blocks", f"in [1, {self.depth}]")
        if self.injector == "car" and self.blocks is not None:
            need = f"at least car_blocks = {self.side_blocks} blocks (each side block feeds one)"
            self.require(len(self.blocks) >= self.side_blocks, "blocks", need)
        self.require(self.car_condition in ("class", "none"), "car_condition", '"class" or "none"')
        self.require(self.car_targets in ("last", "rest"), "car_targets", '"last" or "rest"')
        self.require(self.prefix_condition in ("class", "none"), "prefix_condition", '"class" or "none"')
        if self.injector == "car" and self.blocks is None and self.car_targets == "rest":
            rest = f'"last" when car_blocks is the depth ({self.depth}): "rest" leaves no block to feed'
            self.require(self.side_blocks < self.depth, "car_targets", rest)
        for name in ("control_drop_rate", "modality_drop_rate"):
            self.require(0 <= getattr(self, name) < 1, name, "in [0, 1)")

    @property
    def in_channels(self) -> int:
        return sum(self.num_segments if m == "segmentation" else 1 for m in self.modalities)

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.resolution // self.patch_nums[-1]))

    @property
    def injected_blocks(self) -> tuple[int, ...]:
        """The blocks whose input (scalar, controlar, car) or output (ecm) receives control."""
        if self.blocks is not None:
            return tuple(sorted(self.blocks))
        if self.injector == "car":
            first = self.side_blocks if self.car_targets == "rest" else self.depth - self.side_blocks
            return tuple(range(first, self.depth))
        if self.injector == "controlar":
            return tuple(sorted({0, self.depth // 3, 2 * self.depth // 3}))
        if self.injector == "ecm":
            return tuple(range(1, self.depth, 2)) or (0,)
        return tuple(range(self.depth))

    @property
    def side_blocks(self) -> int:
        """CAR: how many backbone blocks the side branch copies."""
        return self.car_blocks if self.car_blocks is not None else max(1, self.depth // 2)

    @property
    def prefix_grid(self) -> int:
        """prefill: the side of the prefix grid."""
        if self.prefix_side is not None:
            return self.prefix_side
        half = [p for p in self.patch_nums if p <= self.patch_nums[-1] // 2]
        return half[-1] if half else self.patch_nums[0]

    @classmethod
    def for_var(cls, var_config, resolution: int, **fields) -> ControlConfig:
        """The branch of a VAR with this config (depth, width, scales) for maps of ``resolution`` px."""
        return cls.resolve(fields, **shape_of(var_config, resolution))


# car in CAR's own layout, the defaults of its fields: depth / 2 side blocks conditioned on the class, each
# feeding one of the last blocks (conf/control.yaml's car, the demo's, sets other values)
CAR_OWN_LAYOUT = {f.name: f.default for f in dataclasses.fields(ControlConfig) if f.name.startswith("car_")}


def shape_of(var_config, resolution: int) -> dict:
    """The ControlConfig fields that follow from the VAR (blocks, width, scales) and the tokenizer (side)."""
    return {
        "depth": var_config.depth,
        "embed_dim": var_config.C,
        "patch_nums": tuple(var_config.patch_nums),
        "resolution": int(resolution),
        "num_heads": var_config.heads,
        "cond_dim": var_config.D,
        "mlp_ratio": float(var_config.mlp_ratio),
        "norm_eps": float(var_config.norm_eps),
        "shared_aln": bool(var_config.shared_aln),
        "attn_l2_norm": bool(var_config.attn_l2_norm),
        "text": var_config.condition == "text",
    }
