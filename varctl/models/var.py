"""The VAR transformer: next-scale prediction (Tian et al., "Visual Autoregressive Modeling", 2024, eq. 6).

Tokens of all scales form one sequence, smallest scale first; a block-causal mask lets each token see its own
scale and all earlier ones. The condition (a class, or a text embedding for text models) is the start token
and drives every AdaLN. The state_dict of a class model equals the official one key for key, so official
checkpoints (``var_d16.pth`` ...) load strictly with no conversion. The VQVAE is attached, never owned.

Legend: B batch, L all tokens, l tokens of one scale, C width, D condition width, V vocabulary,
Cv = Cvae code channels, K scales, T text tokens, E text embedding width.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models import io
from varctl.models.sampling import (
    check_sampling_args,
    filter_logits,
    guidance_schedule,
    make_generator,
    per_scale,
    sample_tokens,
    smooth_embedding,
)
from varctl.models.transformer import AdaLNBlock, AdaLNHead, KVCache, SharedAdaLin, key_padding_bias

KIND = "var"
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 256 px
CONDITIONS = ("class", "text")
PRESETS = {  # "d<N>" is any depth with the official width/heads rule
    "tiny": {"depth": 2, "num_classes": 10, "vocab_size": 256, "z_channels": 16, "patch_nums": (1, 2, 3, 4)},
}


@dataclass
class VARConfig:
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
            (
                len(self.patch_nums) >= 1 and min(self.patch_nums) >= 1,
                "patch_nums",
                "non-empty, >= 1",
                self.patch_nums,
            ),
            (
                all(a < b for a, b in zip(self.patch_nums, self.patch_nums[1:])),
                "patch_nums",
                "strictly increasing (small to large)",
                self.patch_nums,
            ),
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
        for ok, key, expected, found in checks:
            if not ok:
                raise ValueError(f"VARConfig.{key} must be {expected}, found {found!r}")

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
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale in the token sequence."""
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

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

    @classmethod
    def from_dict(cls, config: dict, source: str = "<dict>") -> VARConfig:
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown VARConfig keys {unknown}")
        return cls(**config)


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


class VAR(nn.Module):
    """Class- or text-conditional VAR transformer with teacher-forcing ``forward`` and guided ``generate``."""

    def __init__(self, config: VARConfig | None = None, vae: nn.Module | None = None):
        super().__init__()
        cfg = self.config = config if config is not None else VARConfig()
        C, D, L, K = cfg.C, cfg.D, cfg.L, cfg.num_scales
        self.pos_start = nn.Parameter(torch.empty(1, cfg.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.word_embed = nn.Linear(cfg.z_channels, C)
        if cfg.condition == "class":
            self.class_emb = nn.Embedding(cfg.num_classes + 1, D)  # row num_classes: the null class
        else:
            self.text_pooled_proj = nn.Linear(cfg.pooled_dim, D)
            self.text_tokens_proj = nn.Linear(cfg.text_dim, C)
        self.lvl_embed = nn.Embedding(K, C)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(D, 6 * C)) if cfg.shared_aln else nn.Identity()
        )
        depth = cfg.depth
        dpr = [cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linearly increasing drop path
        block_args = dict(
            mlp_ratio=cfg.mlp_ratio, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, norm_eps=cfg.norm_eps,
            shared_aln=cfg.shared_aln, attn_l2_norm=cfg.attn_l2_norm, cross_attn=cfg.condition == "text",
        )  # fmt: skip
        self.blocks = nn.ModuleList(AdaLNBlock(C, D, cfg.heads, drop_path=p, **block_args) for p in dpr)
        # scale index of every token, and the block-causal additive mask (0: visible, -inf: a later scale)
        lvl_L1 = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)]).view(L, 1)
        self.register_buffer("lvl_1L", lvl_L1.view(1, L).clone())
        mask_LL = torch.where(lvl_L1 >= lvl_L1.view(1, L), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask_LL.view(1, 1, L, L).contiguous())
        self.head_nm = AdaLNHead(C, D, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        if cfg.condition == "text":  # the empty caption's embedding; all-False mask = not set yet
            self.register_buffer("null_text_pooled", torch.zeros(1, cfg.pooled_dim))
            self.register_buffer("null_text_tokens", torch.zeros(1, cfg.text_len, cfg.text_dim))
            self.register_buffer("null_text_mask", torch.zeros(1, cfg.text_len, dtype=torch.bool))
        self._vae: tuple = ()  # a tuple so the VQVAE is not a submodule (not in state_dict, not trained)
        self.init_weights()
        if vae is not None:
            self.attach_vae(vae)

    # ------------------------------------------------------------------------------------------ setup
    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0) -> None:
        """The official initialisation (init_std < 0: sqrt(1 / 3C)); AdaLN gammas ~0 so blocks start near
        identity, the head small, cross-attention outputs zero."""
        C, depth = self.config.C, self.config.depth
        auto_std = math.sqrt(1 / C / 3)
        std = auto_std if init_std < 0 else init_std
        nn.init.trunc_normal_(self.pos_start, std=auto_std)
        nn.init.trunc_normal_(self.pos_1LC, std=auto_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        if init_head >= 0:
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            attn = block.attn
            if attn.l2_norm:
                attn.scale_mul_1H11.fill_(math.log(4.0))
            attn.q_bias.zero_()
            attn.v_bias.zero_()
            attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if block.shared_aln:
                block.ada_gss.normal_().div_(C**0.5)
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * C :].mul_(init_adaln)
                block.ada_lin[-1].weight[: 2 * C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()
            if block.cross_attn is not None:
                block.cross_attn.proj.weight.zero_()
                block.cross_attn.proj.bias.zero_()

    def attach_vae(self, vae: nn.Module) -> VAR:
        """Use ``vae`` for sampling; kept outside the module tree (``.to()`` does not move it)."""
        check_vae_fits(self.config, vae)
        self._vae = (vae,)
        return self

    @property
    def vae(self) -> nn.Module | None:
        return self._vae[0] if self._vae else None

    @torch.no_grad()
    def set_null_text(self, null: TextCondition) -> None:
        """Store the empty caption's embedding (batch 1) as the null condition of a text model."""
        self._require_text("set_null_text")
        cfg = self.config
        p, t, m = null
        if p.shape != (1, cfg.pooled_dim) or t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != cfg.text_dim:
            raise ValueError(
                f"set_null_text: expected pooled (1, {cfg.pooled_dim}) and tokens (1, T, {cfg.text_dim}), "
                f"found {tuple(p.shape)} and {tuple(t.shape)}"
            )
        if t.shape[1] > cfg.text_len or m.shape != t.shape[:2] or not bool(m.bool().any()):
            raise ValueError(
                f"set_null_text: need T <= text_len={cfg.text_len}, mask (1, T) with >= 1 real token; "
                f"found tokens {tuple(t.shape)}, mask {tuple(m.shape)} with {int(m.bool().sum())} real tokens"
            )
        null = TextCondition(p, t, m.bool()).padded(cfg.text_len)
        self.null_text_pooled.copy_(null.pooled_BE)
        self.null_text_tokens.copy_(null.tokens_BTE)
        self.null_text_mask.copy_(null.mask_BT)

    def _require_text(self, what: str) -> None:
        if self.config.condition != "text":
            raise ValueError(f"{what} needs a text model (VARConfig.condition='text'), this one is 'class'")

    # ------------------------------------------------------------------------------------------ condition
    def null_condition(self, B: int):
        """B copies of the unconditional input: the null class, or the stored empty-caption embedding."""
        if self.config.condition == "class":
            return torch.full((B,), self.config.num_classes, dtype=torch.long, device=self.lvl_1L.device)
        if not bool(self.null_text_mask.any()):
            raise RuntimeError("the null text condition is not set: call var.set_null_text(encoder(['']))")
        return TextCondition(self.null_text_pooled, self.null_text_tokens, self.null_text_mask).expand(B)

    def _embed_condition(self, cond, drop: bool):
        """-> (cond_BD, text) where text is None or (ctx_BTC, bias_B11T, gate_B11) for cross-attention."""
        cfg = self.config
        if cfg.condition == "class":
            if not isinstance(cond, torch.Tensor) or cond.dim() != 1:
                raise TypeError(f"a class VAR takes labels as a 1-D LongTensor, found {type(cond).__name__}")
            if drop and cfg.cond_drop_rate > 0:
                cond = torch.where(
                    torch.rand(cond.shape, device=cond.device) < cfg.cond_drop_rate, cfg.num_classes, cond
                )
            return self.class_emb(cond), None
        if not isinstance(cond, TextCondition):
            raise TypeError(f"a text VAR takes a TextCondition, found {type(cond).__name__}")
        if drop and cfg.cond_drop_rate > 0:
            take_null = torch.rand(cond.batch_size, device=cond.pooled_BE.device) < cfg.cond_drop_rate
            cond = cond.where(take_null, self.null_condition(cond.batch_size))
        dtype = self.text_pooled_proj.weight.dtype
        cond_BD = self.text_pooled_proj(cond.pooled_BE.to(dtype))
        ctx_BTC = self.text_tokens_proj(cond.tokens_BTE.to(dtype))
        return cond_BD, (ctx_BTC, *key_padding_bias(cond.mask_BT.bool()))

    def _lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)

    def _head(self, h_BlC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        """The head runs in the weights' dtype (float32 unless the model was cast), logits in float32."""
        dtype = self.head.weight.dtype
        return self.head(self.head_nm(h_BlC.to(dtype), mod_B12C).to(dtype)).float()

    # ------------------------------------------------------------------------------------------ training
    def forward(self, cond, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) float32 for all scales at once.

        ``cond``: labels (B,) for class models or a TextCondition; in train mode each sample's condition is
        replaced by the null one with probability ``cond_drop_rate``. ``x_BLCv_wo_first_l``: the VQVAE's
        ``idx_to_var_input`` (B, L - first_l, Cv).
        """
        cfg = self.config
        B = x_BLCv_wo_first_l.shape[0]
        if x_BLCv_wo_first_l.shape[1:] != (cfg.L - cfg.first_l, cfg.z_channels):
            raise ValueError(
                f"x_BLCv_wo_first_l must be (B, {cfg.L - cfg.first_l}, {cfg.z_channels}) for patch_nums "
                f"{cfg.patch_nums}, found {tuple(x_BLCv_wo_first_l.shape)}"
            )
        device_type = x_BLCv_wo_first_l.device.type
        with torch.autocast(device_type, enabled=False):  # embeddings in float32, as the official code
            cond_BD, text = self._embed_condition(cond, drop=self.training)
            sos_B1C = cond_BD.unsqueeze(1).expand(B, cfg.first_l, -1) + self.pos_start.expand(B, -1, -1)
            x_BLC = torch.cat(
                (sos_B1C, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1
            )
            x_BLC = x_BLC + self._lvl_pos()  # (B, L, C)
        if torch.is_autocast_enabled(device_type):  # keep the residual stream in the autocast dtype
            x_BLC = x_BLC.to(torch.get_autocast_dtype(device_type))
        shared = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            block_text = None if text is None else (block.cross_attn.context(text[0]), *text[1:])
            x_BLC = block(x_BLC, block.modulation(shared), self.attn_bias_for_masking, text=block_text)
        return self._head(x_BLC, self.head_nm.modulation(cond_BD))

    # ------------------------------------------------------------------------------------------ sampling
    def _sampling_condition(self, cond, batch_size: int | None):
        cfg, device = self.config, self.lvl_1L.device
        if isinstance(cond, TextCondition):
            self._require_text("a TextCondition")
            B = cond.batch_size
        elif cfg.condition == "text":
            raise TypeError(f"a text VAR samples from a TextCondition, found {type(cond).__name__}")
        elif isinstance(cond, int):
            if batch_size is None:
                raise ValueError("generate(cond=<int>) needs batch_size=")
            label = cfg.num_classes if cond < 0 else cond  # < 0: unconditional (the null class)
            cond = torch.full((batch_size,), label, dtype=torch.long, device=device)
        elif isinstance(cond, torch.Tensor) and cond.dim() == 1 and not cond.is_floating_point():
            cond = cond.to(device=device, dtype=torch.long)
        else:
            raise TypeError(
                f"cond must be labels (1-D LongTensor), an int or a TextCondition, found {cond!r}"
            )
        if isinstance(cond, torch.Tensor):
            B = cond.shape[0]
            if B and not (0 <= int(cond.min()) and int(cond.max()) <= cfg.num_classes):
                raise ValueError(f"labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
        if batch_size is not None and batch_size != B:
            raise ValueError(f"batch_size={batch_size} but the condition holds {B} samples")
        return cond.to(device) if isinstance(cond, TextCondition) else cond, B

    @torch.no_grad()
    def generate(
        self,
        cond,
        *,
        batch_size: int | None = None,
        cfg=1.5,
        cfg_schedule: str = "linear",
        top_k=0,
        top_p=0.0,
        temperature=1.0,
        more_smooth: bool = False,
        seed: int | None = None,
        return_intermediates: bool = False,
        vae: nn.Module | None = None,
        callback=None,
    ):
        """Sample images scale by scale with a KV cache and classifier-free guidance.

        The KV caches and the random generator belong to this call only (nothing is stored on the module), so
        an interrupted call leaves no state behind and concurrent calls do not interfere.

        Args:
            cond: labels (B,) LongTensor, an int label for ``batch_size`` samples (< 0: unconditional), or a
                TextCondition for text models.
            cfg: guidance strength; mixed logits are (1 + t) * cond - t * uncond with t from
                ``cfg_schedule`` ("linear": t = cfg * k / (K - 1), the official; "constant": t = cfg), or a
                list with t for each of the K scales.
            top_k, top_p, temperature: scalars or per-scale lists; top_k 0 and top_p 0 switch them off.
            more_smooth: use a Gumbel-softmax mix of code vectors instead of the sampled code (official
                visualisation trick).
            seed: seeds this call's own generator (the global RNG is neither used nor changed); None: random.
            return_intermediates: also return the K images decoded from f_hat after each scale.
            vae: the VQVAE to decode with; default the attached one.
            callback: called as ``callback(si, logits_BlV, idx_Bl, f_hat_BChw)`` after each scale with the
                guided logits (before temperature and filtering), the sampled tokens and the running f_hat.
        Returns:
            images (B, 3, H, W) in [0, 1], and the list of per-scale images if ``return_intermediates``.
        """
        vae = self._sampling_vae(vae)
        c = self.config
        K = c.num_scales
        ts = guidance_schedule(cfg, cfg_schedule, K)
        top_ks, top_ps = per_scale(top_k, K, "top_k"), per_scale(top_p, K, "top_p")
        temps = per_scale(temperature, K, "temperature")
        check_sampling_args(top_ks, top_ps, temps)
        cond, B = self._sampling_condition(cond, batch_size)
        guided = any(t != 0 for t in ts)  # without guidance the null half is never needed
        if guided:
            null = self.null_condition(B)
            cond = cond.cat(null) if isinstance(cond, TextCondition) else torch.cat((cond, null))
        device = self.lvl_1L.device
        generator = make_generator(device, seed)

        # everything that depends only on the condition is computed once per call, not once per scale
        cond_BD, text = self._embed_condition(cond, drop=False)
        shared = self.shared_ada_lin(cond_BD)
        mods = [block.modulation(shared) for block in self.blocks]
        head_mod = self.head_nm.modulation(cond_BD)
        texts = [None if text is None else (b.cross_attn.context(text[0]), *text[1:]) for b in self.blocks]
        caches = [KVCache(c.L) for _ in self.blocks]
        lvl_pos = self._lvl_pos()
        codebook_VC = vae.quantize.embedding.weight
        B2 = cond_BD.shape[0]
        x_BlC = (
            cond_BD.unsqueeze(1).expand(B2, c.first_l, -1)
            + self.pos_start.expand(B2, -1, -1)
            + lvl_pos[:, : c.first_l]
        )
        f_hat = codebook_VC.new_zeros(B, c.z_channels, c.patch_nums[-1], c.patch_nums[-1])
        intermediates = []
        for si, pn in enumerate(c.patch_nums):
            ratio = si / (K - 1) if K > 1 else 0.0
            for block, mod, cache, block_text in zip(self.blocks, mods, caches, texts):
                x_BlC = block(x_BlC, mod, cache=cache, text=block_text)
            logits_BlV = self._guided_logits(x_BlC, head_mod, ts[si], B, guided)
            sample_logits = logits_BlV if temps[si] == 1 else logits_BlV / temps[si]
            sample_logits = filter_logits(sample_logits, int(top_ks[si]), float(top_ps[si]))
            idx_Bl = sample_tokens(sample_logits, generator)
            if more_smooth:  # after the tokens, same generator, filtered logits: as the official sampler
                h_BlCv = smooth_embedding(sample_logits, codebook_VC, ratio, generator)
            else:
                h_BlCv = F.embedding(idx_Bl, codebook_VC)
            h_BChw = h_BlCv.transpose(1, 2).reshape(B, c.z_channels, pn, pn)
            f_hat, next_BChw = vae.ar_step(si, f_hat, h_BChw)
            if callback is not None:
                callback(si, logits_BlV, idx_Bl, f_hat)
            if si == K - 1:
                break
            if return_intermediates:
                intermediates.append(vae.fhat_to_img(f_hat).float().add_(1).mul_(0.5))
            begin, end = c.begin_ends[si + 1]
            next_BlCv = next_BChw.reshape(B, c.z_channels, -1).transpose(1, 2)  # (B, l, Cv)
            x_BlC = self.word_embed(next_BlCv.to(self.word_embed.weight.dtype)) + lvl_pos[:, begin:end]
            if guided:
                x_BlC = torch.cat((x_BlC, x_BlC))  # the null half sees the same tokens
        images = vae.fhat_to_img(f_hat).float().add_(1).mul_(0.5)
        if return_intermediates:
            return images, intermediates + [images]
        return images

    def _guided_logits(
        self, x_BlC: torch.Tensor, head_mod: torch.Tensor, t: float, B: int, guided: bool
    ) -> torch.Tensor:
        """(1 + t) * cond - t * uncond logits of one scale, (B, l, V) float32.

        The head's Linear is affine, so the mix is taken on its input: one head matmul for B rows, not 2B;
        with t = 0 the null half skips the head altogether.
        """
        if not guided or t == 0:
            return self._head(x_BlC[:B], head_mod[:B])
        dtype = self.head.weight.dtype
        h_BlC = self.head_nm(x_BlC.to(dtype), head_mod).to(dtype)
        mixed = (1 + t) * h_BlC[:B] - t * h_BlC[B:]
        return self.head(mixed).float()

    def _sampling_vae(self, vae: nn.Module | None) -> nn.Module:
        if vae is None:
            if self.vae is None:
                raise RuntimeError("generate needs a VQVAE: pass vae= or call var.attach_vae(vae) first")
            return self.vae
        if vae is not self.vae:
            check_vae_fits(self.config, vae)
        return vae

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a self-describing varctl model file (config + state_dict) atomically."""
        return io.atomic_save(io.model_file(KIND, asdict(self.config), self.state_dict()), path)

    def export_safetensors(self, path: str | os.PathLike) -> Path:
        """Weights as safetensors, with the config as JSON in the metadata."""
        meta = {"format": io.FORMAT, "kind": KIND, "config": json.dumps(asdict(self.config))}
        return io.save_safetensors(self.state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, vae: nn.Module | None = None, map_location="cpu") -> VAR:
        """Load a varctl model file, a varctl Lightning checkpoint (kind "var"), a safetensors export or an
        official state_dict (configuration read off the shapes, ``patch_nums`` from ``vae`` if given)."""
        path = Path(path)
        source = str(path)
        obj = io.load_file(path, map_location=map_location)
        if path.suffix == ".safetensors":
            state_dict, config = obj, _safetensors_config(path)
        else:
            state_dict, config = io.split_checkpoint(obj, KIND, source)
        if config is None:
            patch_nums = tuple(vae.config.patch_nums) if vae is not None else OFFICIAL_PATCH_NUMS
            config = config_from_state_dict(state_dict, patch_nums, source)
        else:
            config = VARConfig.from_dict(config, source)
        return cls._from_state_dict(state_dict, config, source, vae)

    @classmethod
    def from_official(
        cls, path_or_state_dict, vae: nn.Module | None = None, patch_nums: tuple[int, ...] | None = None
    ) -> VAR:
        """Build from an official checkpoint (``var_d16.pth`` ...): depth, classes, vocabulary, Cvae,
        shared_aln and attn_l2_norm are read off the tensors; loaded with ``strict=True``.

        Args:
            path_or_state_dict: a path or a state_dict (meta tensors give a model on the meta device).
            vae: the VQVAE to attach (may be None).
            patch_nums: the scale schedule (not stored in official files); default the VQVAE's, else 256 px.
        """
        if isinstance(path_or_state_dict, dict):
            source, state_dict = "<state_dict>", path_or_state_dict
        else:
            source = str(path_or_state_dict)
            state_dict, _ = io.split_checkpoint(io.load_file(path_or_state_dict), KIND, source)
        if patch_nums is None:
            patch_nums = tuple(vae.config.patch_nums) if vae is not None else OFFICIAL_PATCH_NUMS
        return cls._from_state_dict(
            state_dict, config_from_state_dict(state_dict, patch_nums, source), source, vae
        )

    @classmethod
    def _from_state_dict(cls, state_dict: dict, config: VARConfig, source: str, vae) -> VAR:
        with torch.device("meta"):  # no allocation or init: the tensors are assigned from the file
            model = cls(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source}: state_dict does not match {config}: missing {_short(missing)}, "
                f"unexpected {_short(unexpected)}"
            )
        for k, v in expected.items():
            if tuple(state_dict[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"{source}: tensor {k} has shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)} "
                    f"for {config}"
                )
        model.load_state_dict(state_dict, strict=True, assign=True)
        if vae is not None:
            model.attach_vae(vae)
        return model


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


def _safetensors_config(path: Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != io.FORMAT:
        return None
    if meta.get("kind") != KIND:
        raise ValueError(f"{path}: a varctl '{meta.get('kind')}' export, expected a '{KIND}' export")
    return json.loads(meta["config"])


def _short(keys: list[str], n: int = 6) -> str:
    return str(keys[:n] + ([f"... {len(keys) - n} more"] if len(keys) > n else []))
