"""Scale-wise control of VAR (SCALAR-style conditional decoding, arXiv 2507.19946, sec. 3).

A control encoder maps the control maps (edges, depth, segmentation) to one scale-independent feature map
F_c at the size of the last scale. For every scale k and every transformer block l an unshared linear map
P_{k,l} turns Resize_k(F_c) into a residual C_{k,l} that is added to the hidden states of scale k entering
block l: x <- x + C_{k,l}. The projections are zero-initialised (ControlNet's zero convolution), so a fresh
branch leaves the VAR's outputs unchanged and training starts from the backbone's behaviour.

The branch is a separate module with its own file kind: the backbone VAR keeps the official layout and loads
official checkpoints as before. ``ControlBranch.encode`` returns a ``ControlResiduals`` that ``VAR.forward``
and ``VAR.generate`` take as ``control=``; the VAR only calls it as ``control(layer, begin, end)``.

Legend: B batch, L all tokens, l tokens of one scale, C VAR width, F control feature width, K scales,
H W control map size, pn side of one scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.lifecycle import OFFICIAL_PATCH_NUMS, Model, ModelConfig

MODALITIES = ("edges", "depth", "segmentation")  # the control maps every part of varctl knows


@dataclass
class ControlConfig(ModelConfig):
    """The control branch of one VAR: its inputs, the encoder's size, and the backbone's shape (``depth``,
    ``embed_dim`` and ``patch_nums`` come from the VAR, ``resolution`` from the tokenizer)."""

    modalities: tuple[str, ...] = ("edges",)
    num_segments: int = 16  # segmentation ids 0..num_segments-1, one-hot encoded
    width: int = 32  # channels of the encoder's first stage, doubled at every downsampling
    feature_dim: int = 256  # F, the channels of the scale-independent feature map
    max_width: int = 256
    depth: int = 16  # blocks of the VAR: one projection per (scale, block)
    embed_dim: int = 1024  # C, the VAR's width
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    resolution: int = 256  # side of the control maps (= the images)

    def __post_init__(self):
        self.modalities = tuple(str(m) for m in self.modalities)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        # the invariants whose failure would surface later as a confusing lookup or shape error
        known = len(self.modalities) == len(set(self.modalities)) >= 1 and set(self.modalities) <= set(
            MODALITIES
        )
        self.require(known, "modalities", f"a non-empty list of distinct modalities from {MODALITIES}")
        self.check_schedule()
        down = self.resolution / self.patch_nums[-1]
        fits = down >= 1 and down == int(down) and math.log2(down) == int(math.log2(down))
        self.require(fits, "resolution", f"the last scale ({self.patch_nums[-1]}) times a power of 2")

    @property
    def in_channels(self) -> int:
        return sum(self.num_segments if m == "segmentation" else 1 for m in self.modalities)

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.resolution // self.patch_nums[-1]))

    @classmethod
    def for_var(cls, var_config, resolution: int, **fields) -> ControlConfig:
        """The branch of a VAR with this config (depth, width, scales) for maps of ``resolution`` px."""
        return cls.resolve(fields, **shape_of(var_config, resolution))


def shape_of(var_config, resolution: int) -> dict:
    """The ControlConfig fields that follow from the VAR (depth, width, scales) and the tokenizer (side)."""
    return {
        "depth": var_config.depth,
        "embed_dim": var_config.C,
        "patch_nums": tuple(var_config.patch_nums),
        "resolution": int(resolution),
    }


def control_input(config: ControlConfig, maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's control maps (modality -> (B, 1, H, W)) as one float input (B, in_channels, H, W).

    edges and depth are used as they are ({0,1} and [0,1]); segmentation ids become one-hot channels.
    """
    missing = [m for m in config.modalities if m not in maps]
    if missing:
        raise KeyError(
            f"control maps {missing} are missing (the branch takes {list(config.modalities)}, the batch has "
            f"{sorted(maps)}); set data.controls to include them"
        )
    size = (config.resolution, config.resolution)
    channels = []
    for m in config.modalities:
        x = maps[m]
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != size:
            raise ValueError(f"control['{m}'] must be (B, 1, {size[0]}, {size[1]}), found {tuple(x.shape)}")
        if m == "segmentation":
            ids = x[:, 0].long()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_segments):
                raise ValueError(
                    f"control['segmentation'] holds ids in [{int(ids.min())}, {int(ids.max())}], expected "
                    f"[0, {config.num_segments}); raise model.control.num_segments"
                )
            channels.append(F.one_hot(ids, config.num_segments).permute(0, 3, 1, 2).float())  # (B, S, H, W)
        else:
            channels.append(x.float())
    return torch.cat(channels, dim=1)


class ControlResiduals:
    """The residuals of one batch of control maps: ``self(layer, begin, end)`` -> (B, end - begin, C) to add
    to the hidden states of tokens [begin, end) entering block ``layer``; [begin, end) covers whole scales."""

    def __init__(self, branch: ControlBranch, tokens_BLF: torch.Tensor):
        self.branch, self.tokens_BLF = branch, tokens_BLF

    @property
    def batch_size(self) -> int:
        return self.tokens_BLF.shape[0]

    def __call__(self, layer: int, begin: int, end: int) -> torch.Tensor:
        return self.branch.project(self.tokens_BLF, layer, begin, end)


class ControlBranch(Model):
    """Control encoder (conv, downsampling to the last scale) + per-(scale, block) zero-init projections."""

    kind = "control"
    config_class = ControlConfig

    def __init__(self, config: ControlConfig):
        super().__init__()
        self.config = cfg = config
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1), nn.SiLU()]
        ch = cfg.width
        for _ in range(cfg.num_downsamples):
            out = min(2 * ch, cfg.max_width)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GroupNorm(_groups(out), out), nn.SiLU()]
            ch = out
        layers.append(nn.Conv2d(ch, cfg.feature_dim, 1))
        self.encoder = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.feature_dim)
        K, Fd, C = cfg.num_scales, cfg.feature_dim, cfg.embed_dim
        # P_{k,l}: weight (depth, K, F, C) and bias (depth, K, C), zero: a fresh branch changes nothing
        self.proj_weight = nn.Parameter(torch.zeros(cfg.depth, K, Fd, C))
        self.proj_bias = nn.Parameter(torch.zeros(cfg.depth, K, C))
        self._scale_at = {b: k for k, (b, _) in enumerate(cfg.begin_ends)}  # first token -> scale

    def features(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """F_c (B, F, pn_K, pn_K): the scale-independent feature map."""
        x = control_input(self.config, maps).to(self.proj_weight.device)
        return self.encoder(x.to(self.encoder[0].weight.dtype))

    def encode(self, maps: dict[str, torch.Tensor]) -> ControlResiduals:
        """Control maps -> the residuals the VAR adds (``VAR.forward(..., control=)``, ``generate``)."""
        f_BFhw = self.features(maps)
        tokens = [
            F.interpolate(f_BFhw, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)  # (B, pn*pn, F)
            for pn in self.config.patch_nums
        ]
        return ControlResiduals(self, self.norm(torch.cat(tokens, dim=1)))  # (B, L, F)

    def project(self, tokens_BLF: torch.Tensor, layer: int, begin: int, end: int) -> torch.Tensor:
        """C_{k,l} of the tokens [begin, end) (whole scales) entering block ``layer``: (B, end - begin, C)."""
        if begin not in self._scale_at or (end != self.config.L and end not in self._scale_at):
            raise ValueError(
                f"control residuals cover whole scales {self.config.begin_ends}, not [{begin}, {end})"
            )
        out, k = [], self._scale_at[begin]
        while k < self.config.num_scales and self.config.begin_ends[k][1] <= end:
            b, e = self.config.begin_ends[k]
            x = tokens_BLF[:, b:e]
            out.append(x @ self.proj_weight[layer, k].to(x.dtype) + self.proj_bias[layer, k].to(x.dtype))
            k += 1
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


class ControlledVAR(nn.Module):
    """A VAR and its control branch as one module, the unit the control stage trains, averages and shards
    (FSDP2 keeps the branch unsharded while the VAR runs): ``forward`` and ``generate`` take the batch's
    control maps (modality -> (B, 1, H, W)). The VAR keeps the official layout under ``var.``."""

    def __init__(self, var: nn.Module, control: ControlBranch):
        super().__init__()
        self.var, self.control = var, control

    def forward(self, cond, x_BLCv_wo_first_l: torch.Tensor, control_maps: dict) -> torch.Tensor:
        return self.var(cond, x_BLCv_wo_first_l, control=self.control.encode(control_maps))

    @torch.no_grad()
    def generate(self, cond, *, control_maps: dict, **kwargs):
        """``VAR.generate`` (same arguments) under the control of ``control_maps``."""
        return self.var.generate(cond, control=self.control.encode(control_maps), **kwargs)
