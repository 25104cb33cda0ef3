"""The control branch of a VAR: an encoder (encoders.py) maps the control maps to one scale-independent
feature map F_c at the size of the last scale; F_c resized to every scale gives each token a control feature;
an injector (injectors/, chosen by ``ControlConfig.injector``) brings them into the VAR.

The branch is a separate module with its own file kind: the backbone VAR keeps the official layout and loads
official checkpoints as before. ``ControlBranch.encode`` returns the batch's ``Controls``, which
``VAR.forward`` and ``VAR.generate`` take as ``control=``.

Control guidance: a sample whose control is dropped (``control_drop_rate`` in training, the control-dropped
copy while sampling with ``control_cfg``) gets zero features, the null control.

Legend: B batch, R rows (B, or its guidance copies), L all tokens, C VAR width, F control feature width.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.control.config import ControlConfig
from varctl.models.control.encoders import PretrainedEncoder, build_encoder, check_maps
from varctl.models.control.injectors import INJECTOR_CLASSES, Context, Session
from varctl.models.lifecycle import Model


@functools.cache
@torch.inference_mode(False)  # cached: a first call under inference mode (sampling) must not break training
def area_pooling(side: int, patch_nums: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(side^2, L): ``F.interpolate(mode="area")`` of a side x side map to every scale (row-major, scale
    after scale) as one matrix, so the tokens' features of all scales are one product (2-5x faster than an
    interpolation per scale on the CPU, equal to float rounding)."""
    eye = torch.eye(side * side, dtype=torch.float64).view(side * side, 1, side, side)
    pool = torch.cat([F.adaptive_avg_pool2d(eye, pn).flatten(1) for pn in patch_nums], dim=1)
    return pool.float().to(device)


class Controls:
    """The encoded control of one batch: per-token features (B, L, F), the feature map (B, F, h, w), which
    samples keep their control (None: all) and the per-scale strength; ``session`` serves one VAR call."""

    def __init__(self, branch, grid_BFhw, tokens_BLF, keep_B=None, strength_K=None, index_B=None):
        self.branch, self.grid_BFhw, self.tokens_BLF = branch, grid_BFhw, tokens_BLF
        self.keep_B, self.strength_K = keep_B, strength_K
        self.index_B = index_B  # rows taken by `rows`: each one's sample in the encoded batch (None: its own)

    @property
    def batch_size(self) -> int:
        return self.tokens_BLF.shape[0]

    def with_strength(self, strength_K) -> Controls:
        s = None if strength_K is None else tuple(float(v) for v in strength_K)
        return Controls(self.branch, self.grid_BFhw, self.tokens_BLF, self.keep_B, s, self.index_B)

    def rows(self, index_R: torch.Tensor, keep_R: torch.Tensor) -> Controls:
        """Rows ``index_R`` of this batch, the control of rows with ``keep_R`` 0 dropped."""
        keep = keep_R if self.keep_B is None else keep_R * self.keep_B[index_R]
        index = index_R if self.index_B is None else self.index_B[index_R]
        return Controls(
            self.branch, self.grid_BFhw[index_R], self.tokens_BLF[index_R], keep, self.strength_K, index
        )

    def session(self, var, shared: torch.Tensor, text, cached: bool) -> Session:
        tokens, grid = self.tokens_BLF, self.grid_BFhw
        if self.keep_B is not None:
            k = self.keep_B.to(tokens.dtype)
            tokens, grid = tokens * k.view(-1, 1, 1), grid * k.view(-1, 1, 1, 1).to(grid.dtype)
        ctx = Context(var, tokens, grid, self.strength_K, shared, text, cached, self.first_rows())
        return self.branch.injector.session(ctx)

    def first_rows(self) -> list[int] | None:
        """Each row's first row of the same sample with the same control (kept or dropped), or None when
        these rows were not taken by `rows` (every row its own sample)."""
        if self.index_B is None:
            return None
        kept = [1] * len(self.index_B) if self.keep_B is None else (self.keep_B > 0).tolist()
        seen: dict[tuple[int, int], int] = {}
        return [seen.setdefault(key, r) for r, key in enumerate(zip(self.index_B.tolist(), kept))]


class ControlBranch(Model):
    """Encoder + per-token features + injector; ``encode`` maps a batch's control maps to its Controls."""

    kind = "control"
    config_class = ControlConfig

    def __init__(self, config: ControlConfig):
        super().__init__()
        self.config = cfg = config
        # the injector first: parameter order (and so optimizer states) as in the first version's files
        self.injector = INJECTOR_CLASSES[cfg.injector](cfg)
        self.encoder = build_encoder(cfg)
        self.norm = nn.LayerNorm(cfg.feature_dim)

    @classmethod
    def build(cls, config=None, /, weights_later: bool = False, **fixed) -> ControlBranch:
        """A new branch; a pretrained encoder reads its weights (``encoder_weights``) here. ``weights_later``:
        a file that is not there is not an error yet (a checkpoint about to be loaded holds the weights; the
        first encoding without them names the file)."""
        branch = super().build(config, **fixed)
        if hasattr(branch.encoder, "load_pretrained"):
            branch.encoder.load_pretrained(missing_ok=weights_later)
        return branch

    def init_from_backbone(self, var: nn.Module) -> ControlBranch:
        """Initialise what the injector takes from the backbone (CAR's side blocks); for new branches."""
        self.injector.init_from_backbone(var)
        return self

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def features(self, maps, weights=None, allow_missing=False, aligned=None) -> torch.Tensor:
        """F_c (B, F, pn_K, pn_K): the scale-independent feature map (``aligned``: see `encode_and_align`)."""
        extra = {} if aligned is None else {"aligned": aligned}
        return self.encoder.features(maps, weights, allow_missing, **extra)

    def encode(
        self,
        maps: Mapping[str, torch.Tensor],
        modality_strength: Mapping[str, float | torch.Tensor] | None = None,
        allow_missing: bool = False,
        drop: bool = False,
        aligned: dict[str, torch.Tensor] | None = None,
    ) -> Controls:
        """Control maps (modality -> (B, 1, H, W)) -> the Controls that the VAR takes.

        ``modality_strength``: a weight per modality (a float or one per sample). ``allow_missing``: any
        subset of the modalities may be given (inference). ``drop``: draw the training dropouts
        (``modality_drop_rate`` per modality and sample, ``control_drop_rate`` per sample).
        """
        cfg = self.config
        B = next(iter(maps.values())).shape[0] if maps else 0
        weights = {}
        for m in cfg.modalities:
            w = torch.ones(B, device=self.device)
            if modality_strength is not None and m in modality_strength:
                w = w * torch.as_tensor(modality_strength[m], dtype=torch.float32, device=self.device)
            if drop and cfg.modality_drop_rate > 0:
                w = w * (torch.rand(B, device=self.device) >= cfg.modality_drop_rate).float()
            weights[m] = w
        plain = modality_strength is None and not (drop and cfg.modality_drop_rate > 0)
        f_BFhw = self.features(maps, None if plain else weights, allow_missing, aligned)
        pool = area_pooling(f_BFhw.shape[-1], tuple(cfg.patch_nums), f_BFhw.device)
        dtype = torch.promote_types(f_BFhw.dtype, torch.float32)
        with torch.autocast(f_BFhw.device.type, enabled=False):  # the weights (1/9, ...) stay float32
            tokens_BLF = (f_BFhw.flatten(2).to(dtype) @ pool.to(dtype)).transpose(1, 2)
        keep = None
        if drop and cfg.control_drop_rate > 0:
            keep = (torch.rand(B, device=self.device) >= cfg.control_drop_rate).float()
        return Controls(self, f_BFhw, self.norm(tokens_BLF.to(f_BFhw.dtype)), keep)

    def encode_and_align(self, maps, images: torch.Tensor, drop: bool = False):
        """(`encode` of the maps, `alignment_loss` against ``images``) with one pass of the frozen encoder
        over each map: a pretrained encoder's aligned features serve both. For the conv encoder the loss is
        None."""
        if not isinstance(self.encoder, PretrainedEncoder):
            return self.encode(maps, drop=drop), None
        aligned = self.encoder.aligned(maps, check_maps(self.config, maps, allow_missing=False))
        controls = self.encode(maps, drop=drop, aligned=aligned)
        return controls, self.encoder.alignment_loss(maps, images, aligned)

    def alignment_loss(self, maps, images: torch.Tensor) -> torch.Tensor | None:
        """SCALAR-Uni's L2 alignment of each modality to the frozen encoder's features of the real images
        (pretrained encoders; None for the conv encoder, which has no frozen reference)."""
        return self.encoder.alignment_loss(maps, images)

    # ------------------------------------------------------------------ files
    @classmethod
    def upgrade_state_dict(cls, state_dict: dict) -> dict:
        """Files of the first version (one scalar injector, its projections at the branch's root)."""
        renames = {"proj_weight": "injector.proj_weight", "proj_bias": "injector.proj_bias"}
        if not any(k in state_dict for k in renames):
            return state_dict
        return {renames.get(k, k): v for k, v in state_dict.items()}


class ControlledVAR(nn.Module):
    """A VAR and its control branch as one module, the unit the control stage trains, averages and shards
    (FSDP2 keeps the branch unsharded while the VAR runs): ``forward`` and ``generate`` take the batch's
    control maps (modality -> (B, 1, H, W)). The VAR keeps the official layout under ``var.``."""

    def __init__(self, var: nn.Module, control: ControlBranch):
        super().__init__()
        self.var, self.control = var, control
        self.alignment: torch.Tensor | None = None  # the last training forward's alignment loss

    def forward(self, cond, x_BLCv_wo_first_l: torch.Tensor, control_maps: dict, images=None) -> torch.Tensor:
        """Teacher forcing under the control maps; in training with ``images`` (the real images) the
        branch's alignment loss is kept in ``self.alignment`` (computed here, where sharded strategies
        have gathered the branch's weights)."""
        self.alignment = None
        if images is not None and self.training:
            controls, self.alignment = self.control.encode_and_align(control_maps, images, drop=True)
        else:
            controls = self.control.encode(control_maps, drop=self.training)
        return self.var(cond, x_BLCv_wo_first_l, control=controls)

    @torch.no_grad()
    def generate(
        self,
        cond,
        *,
        control_maps: dict,
        modality_strength: Mapping[str, float] | None = None,
        control_cfg=0.0,
        control_strength=1.0,
        refiner=None,
        **kwargs,
    ):
        """``VAR.generate`` (same arguments) under the control of ``control_maps`` (any subset of the
        branch's modalities), each modality weighted by ``modality_strength``; ``control_cfg`` and
        ``control_strength`` as in ``VAR.generate``. A ``refiner`` (CoDe: it draws the scales from
        ``draft_scales`` on) is a smaller ControlledVAR, whose own branch encodes the same maps."""
        modalities = self.control.config.modalities
        for what, given in (("control_maps", control_maps), ("modality_strength", modality_strength or {})):
            unknown = sorted(set(given) - set(modalities))
            if unknown:  # a typo, or a map of a modality the branch was not trained on: never ignored
                raise ValueError(f"{what} names {unknown}, which the control branch does not take: its "
                                 f"modalities are {list(modalities)}")  # fmt: skip
        controls = self.control.encode(control_maps, modality_strength, allow_missing=True)
        if refiner is not None:
            if not isinstance(refiner, ControlledVAR):
                raise TypeError(
                    f"the refiner of a controlled VAR is a ControlledVAR (a smaller VAR and its control "
                    f"branch), found {type(refiner).__name__}"
                )
            own = refiner.control.config.modalities  # the maps of the modalities it takes
            kwargs["refiner_control"] = refiner.control.encode(
                {m: x for m, x in control_maps.items() if m in own},
                {m: w for m, w in (modality_strength or {}).items() if m in own} or None,
                allow_missing=True,
            )
            refiner = refiner.var
        return self.var.generate(
            cond, control=controls, control_cfg=control_cfg, control_strength=control_strength,
            refiner=refiner, **kwargs,
        )  # fmt: skip
