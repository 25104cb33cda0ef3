"""Control encoders: control maps (modality -> (B, 1, H, W)) -> one scale-independent feature map F_c
(B, F, pn_K, pn_K) at the size of the last scale.

- ``ConvEncoder``: a light convolutional encoder trained from scratch; the modalities are concatenated as
  input channels, so a modality's weight (its strength, 0 when it is absent or dropped) scales its channels.
- ``PretrainedEncoder``: a frozen timm image encoder (DINOv2 as SCALAR uses) whose features from several
  layers are concatenated; each modality passes the encoder on its own and a light alignment layer per
  modality maps it into the shared space of the encoder's features of real images (SCALAR-Uni). The
  present modalities are mixed by their weights, then one 1x1 projection gives F channels.
  ``alignment_loss`` pulls each modality's aligned features toward the encoder's features of the real image.

Legend: B batch, F feature width, E the pretrained encoder's (concatenated) width, H W map size.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.control.config import ControlConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_maps(config: ControlConfig, maps: dict[str, torch.Tensor], allow_missing: bool) -> list[str]:
    """The modalities of ``config`` that ``maps`` holds, each checked for shape (one batch size for all)
    and its values: segmentation ids below ``num_segments``; outside training (sampling, scoring: the maps a
    user gives) the other maps in [0, 1], where a GPU may wait for the check."""
    given = [m for m in config.modalities if m in maps]
    missing = [m for m in config.modalities if m not in maps]
    if (missing and not allow_missing) or not given:
        raise KeyError(
            f"control maps {missing} are missing (the branch takes {list(config.modalities)}, the batch has "
            f"{sorted(maps)}); set data.controls to include them"
            + ("" if given else "; at least one modality is needed")
        )
    size = (config.resolution, config.resolution)
    batch = maps[given[0]].shape[0] if maps[given[0]].dim() else 0
    for m in given:
        x = maps[m]
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != size:
            raise ValueError(f"control['{m}'] must be (B, 1, {size[0]}, {size[1]}), found {tuple(x.shape)}")
        if x.shape[0] != batch:
            raise ValueError(f"control['{m}'] holds {x.shape[0]} maps, control['{given[0]}'] {batch}: "
                             "expected one map of each modality per sample")  # fmt: skip
        if m != "segmentation" and not torch.is_grad_enabled() and x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"control['{m}'] holds values in [{lo:g}, {hi:g}], expected [0, 1] (a map "
                                 "of 0-255 values: divide it by 255)")  # fmt: skip
        if m == "segmentation":
            ids = x[:, 0].long()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_segments):
                raise ValueError(
                    f"control['segmentation'] holds ids in [{int(ids.min())}, {int(ids.max())}], expected "
                    f"[0, {config.num_segments}); raise model.control.num_segments"
                )
    return given


def modality_channels(config: ControlConfig, m: str, x: torch.Tensor) -> torch.Tensor:
    """One modality's map as float channels: edges and depth as they are, segmentation ids one-hot."""
    if m == "segmentation":
        return F.one_hot(x[:, 0].long(), config.num_segments).permute(0, 3, 1, 2).float()  # (B, S, H, W)
    return x.float()


def control_input(
    config: ControlConfig,
    maps: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor] | None = None,
    allow_missing: bool = False,
) -> torch.Tensor:
    """The control maps as one float input (B, in_channels, H, W); a missing modality gives zero channels,
    ``weights`` (modality -> (B,)) scale each modality's channels."""
    given = check_maps(config, maps, allow_missing)
    ref = maps[given[0]]
    B, size = ref.shape[0], ref.shape[-2:]
    channels = []
    for m in config.modalities:
        n = config.num_segments if m == "segmentation" else 1
        if m not in given:
            channels.append(torch.zeros(B, n, *size, device=ref.device))
            continue
        x = modality_channels(config, m, maps[m])
        if weights is not None and m in weights:
            x = x * weights[m].to(x.device, x.dtype).view(-1, 1, 1, 1)
        channels.append(x)
    return torch.cat(channels, dim=1)


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


class ConvEncoder(nn.Sequential):
    """conv 3x3 -> [stride-2 conv, GroupNorm, SiLU] per downsampling -> 1x1 to F (the parameter names of
    the branch's first version, so its files load)."""

    def __init__(self, config: ControlConfig):
        cfg = config
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1), nn.SiLU()]
        ch = cfg.width
        for _ in range(cfg.num_downsamples):
            out = min(2 * ch, cfg.max_width)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GroupNorm(_groups(out), out), nn.SiLU()]
            ch = out
        layers.append(nn.Conv2d(ch, cfg.feature_dim, 1))
        super().__init__(*layers)
        self.config = cfg

    def features(self, maps, weights=None, allow_missing=False) -> torch.Tensor:
        x = control_input(self.config, maps, weights, allow_missing).to(self[0].weight.device)
        return self(x.to(self[0].weight.dtype))

    def alignment_loss(self, maps, images) -> torch.Tensor | None:
        return None  # no frozen reference to align to


def _weights_restored(module: PretrainedEncoder, incompatible) -> None:
    """A loaded state_dict holds the frozen encoder's weights (strict loads; a partial one is refused)."""
    module.weights_ready = True


def _palette(n: int) -> torch.Tensor:
    """A fixed colour per segment id (n, 3) in [0, 1], so segmentation maps become RGB images."""
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(n, 3, generator=g)
    colours[0] = 0.0  # background black
    return colours


class PretrainedEncoder(nn.Module):
    """A frozen timm encoder + per-modality alignment (1x1, identity at init) + a shared 1x1 to F.

    The encoder is built with random weights; ``load_pretrained`` reads ``encoder_weights`` (a local file,
    never downloaded) when a new branch is built. A restored branch has the weights in its own file, so a
    checkpoint restores on a machine without that file: the weights are ready once either is loaded
    (``weights_ready``), and the first encoding without them reads the file or names it.
    """

    def __init__(self, config: ControlConfig):
        super().__init__()
        import timm

        cfg = self.config = config
        kwargs = {"num_classes": 0, "img_size": cfg.encoder_input, **(cfg.encoder_kwargs or {})}
        self.backbone = timm.create_model(cfg.encoder_name, pretrained=False, **kwargs)
        self.backbone.requires_grad_(False).eval()
        E = self.backbone.embed_dim * len(cfg.encoder_layers)
        self.align = nn.ModuleDict({m: nn.Conv2d(E, E, 1) for m in cfg.modalities})
        for conv in self.align.values():
            with torch.no_grad():
                conv.weight.copy_(torch.eye(E).view(E, E, 1, 1))
                conv.bias.zero_()
        self.proj = nn.Conv2d(E, cfg.feature_dim, 1)
        for name, value in self.constants().items():
            self.register_buffer(name, value, persistent=False)
        self.weights_ready = cfg.encoder_weights == "random"
        self.register_load_state_dict_post_hook(_weights_restored)

    def constants(self) -> dict[str, torch.Tensor]:
        """The buffers no file holds (a restored branch makes them here, on the CPU): the segment palette and
        the ImageNet normalisation."""
        with torch.device("cpu"):
            return {
                "palette": _palette(self.config.num_segments),
                "mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                "std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
            }

    def load_pretrained(self, missing_ok: bool = False) -> None:
        """Read ``encoder_weights``; "random" keeps the random weights (tests only). ``missing_ok``: a file
        that is not there is left for later (a checkpoint may bring the weights)."""
        name, weights = self.config.encoder_name, self.config.encoder_weights
        if weights == "random":
            return
        if weights is None or not Path(weights).is_file():
            if missing_ok:
                return
            found = "is not set" if weights is None else f"names {weights!r}, which does not exist"
            raise FileNotFoundError(
                f"model.control.encoder_weights {found}: encoder='pretrained' needs the weights of the timm "
                f"model {name!r} as a local file (.safetensors, .pth or pytorch_model.bin; nothing is "
                "downloaded); 'random' builds random weights, for tests only"
            )
        import timm.models

        # timm's loader: unwraps nested state_dicts; the family's filter maps original key names and
        # resamples position embeddings to img_size
        module = sys.modules.get(type(self.backbone).__module__)
        incompatible = timm.models.load_checkpoint(
            self.backbone, weights, strict=False, filter_fn=getattr(module, "checkpoint_filter_fn", None)
        )
        if incompatible.missing_keys:
            raise ValueError(
                f"model.control.encoder_weights={weights!r} does not fit the timm model {name!r}: missing "
                f"{incompatible.missing_keys[:8]} ({len(incompatible.missing_keys)} in all)"
            )
        self.weights_ready = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout and drop-path stay off
        return self

    def rgb(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """A control map as a normalised RGB image at the encoder's input size."""
        if m == "segmentation":
            img = self.palette[x[:, 0].long()].permute(0, 3, 1, 2)
        else:
            img = x.float().expand(-1, 3, -1, -1)
        return self.normalise(img)

    def normalise(self, img01: torch.Tensor) -> torch.Tensor:
        size = self.config.encoder_input
        img = F.interpolate(img01.float(), size=(size, size), mode="bilinear", antialias=True)
        return (img - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's features of a normalised image batch: (B, E, h, w), layers concatenated."""
        if not self.weights_ready:  # never the random weights in silence: the file, or its name in an error
            self.load_pretrained()
        dtype = next(self.backbone.parameters()).dtype
        feats = self.backbone.forward_intermediates(
            img.to(dtype),
            indices=list(self.config.encoder_layers),
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return torch.cat(feats, dim=1).float()

    def aligned(self, maps, given) -> dict[str, torch.Tensor]:
        return {m: self.align[m](self.encode_image(self.rgb(m, maps[m]))) for m in given}

    def features(self, maps, weights=None, allow_missing=False, aligned=None) -> torch.Tensor:
        """``aligned``: the modalities' aligned features when already computed (`encode_and_align`)."""
        given = check_maps(self.config, maps, allow_missing)
        aligned = self.aligned(maps, given) if aligned is None else aligned
        mixed = 0
        for m, f in aligned.items():
            w = weights[m].to(f.dtype).view(-1, 1, 1, 1) if weights is not None and m in weights else 1.0
            mixed = mixed + w * f
        pn = self.config.patch_nums[-1]
        return self.proj(F.interpolate(mixed, size=(pn, pn), mode="bilinear", antialias=True))

    def alignment_loss(self, maps, images, aligned=None) -> torch.Tensor:
        """Mean over modalities of the mean squared distance between a modality's aligned features and the
        encoder's features of the real images (``images`` in [-1, 1]); ``aligned`` as in `features`."""
        given = check_maps(self.config, maps, allow_missing=False)
        target = self.encode_image(self.normalise(images.float().add(1).mul(0.5)))
        aligned = self.aligned(maps, given) if aligned is None else aligned
        return torch.stack([F.mse_loss(f, target) for f in aligned.values()]).mean()


def build_encoder(config: ControlConfig) -> nn.Module:
    return ConvEncoder(config) if config.encoder == "conv" else PretrainedEncoder(config)
