"""The VAR transformer: next-scale prediction (Tian et al., "Visual Autoregressive Modeling", 2024, eq. 6).

Tokens of all scales form one sequence, smallest scale first; a block-causal mask lets each token see its own
scale and all earlier ones. The condition (a class, or a text embedding for text models) is the start token
and drives every AdaLN. The state_dict of a class model equals the official one key for key, so official
checkpoints (``var_d16.pth`` ...) load strictly with no conversion. The VQVAE is attached, never owned.

This file holds the network, teacher forcing and files; the configuration is in var_config.py (re-exported
here) and sampling (``generate``) in var_generate.py.

Legend: B batch, L all tokens, l tokens of one scale, C width, D condition width, V vocabulary,
Cv = Cvae code channels, K scales, T text tokens, E text embedding width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from varctl.models.kernels import Linear
from varctl.models.lifecycle import Model
from varctl.models.text import TextCondition
from varctl.models.transformer import (
    AdaLNBlock,
    AdaLNHead,
    QueryGroups,
    SharedAdaLin,
    block_context,
    key_padding_bias,
)
from varctl.models.var_config import OFFICIAL_PATCH_NUMS, VARConfig, check_vae_fits, config_from_state_dict
from varctl.models.var_generate import GenerateMixin

__all__ = [
    "VAR",
    "VARConfig",
    "TextCondition",
    "check_vae_fits",
    "config_from_state_dict",
    "OFFICIAL_PATCH_NUMS",
]


class VAR(GenerateMixin, Model):
    """Class- or text-conditional VAR transformer with teacher-forcing ``forward`` and guided ``generate``."""

    kind = "var"
    config_class = VARConfig

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
        self.head = Linear(C, cfg.vocab_size)
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

    def _start_tokens(self, cond_BD: torch.Tensor, lvl_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The first scale's input (B, first_l, C) while sampling: the condition plus the start position
        (``lvl_pos``: ``_lvl_pos()`` if already computed)."""
        lvl_pos = self._lvl_pos() if lvl_pos is None else lvl_pos
        return cond_BD.unsqueeze(1) + (self.pos_start + lvl_pos[:, : self.config.first_l])

    def _head(self, h_BlC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        """The head runs in the weights' dtype (float32 unless the model was cast), logits in float32."""
        dtype = self.head.weight.dtype
        return self.head(self.head_nm(h_BlC.to(dtype), mod_B12C).to(dtype)).float()

    # ------------------------------------------------------------------------------------------ training
    def forward(self, cond, x_BLCv_wo_first_l: torch.Tensor, control=None) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) float32 for all scales at once.

        ``cond``: labels (B,) for class models or a TextCondition; in train mode each sample's condition is
        replaced by the null one with probability ``cond_drop_rate``. ``x_BLCv_wo_first_l``: the VQVAE's
        ``idx_to_var_input`` (B, L - first_l, Cv). ``control``: a batch's ``Controls``
        (``ControlBranch.encode``, models/control/), whose injector acts at the hooks of
        models/control/injectors/base.py; or None.
        """
        cfg = self.config
        B = x_BLCv_wo_first_l.shape[0]
        self._check_control(control, B)
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
        mask, prefix = self.attn_bias_for_masking, None
        session = None if control is None else control.session(self, shared, text, cached=False)
        if session is not None:
            prefix = session.prefix()  # injectors with a prefix: tokens that every token attends to first
            mask = session.attention_bias(mask, 0, cfg.L)
        if mask is self.attn_bias_for_masking:  # no prefix: attention by groups of scales (less work)
            mask = self.query_groups()
        if prefix is not None:
            x_prefix = prefix.x.to(x_BLC.dtype)  # (B, P, C): a row each in teacher forcing (index_R None)
            own = prefix.shared is None  # under each row's condition: the tokens' modulations and texts
        for i, block in enumerate(self.blocks):
            if session is not None:
                x_BLC = session.block_input(i, x_BLC, 0, cfg.L)
            mod, block_text = block.modulation(shared), block_context(block, text)
            if prefix is None:
                x_BLC = block(x_BLC, mod, mask, text=block_text)
            else:  # the prefix passes through each block first, in the same call
                prefix_mod = mod if own else block.modulation(prefix.shared)
                prefix_text = block_text if own else block_context(block, prefix.text)
                x_BLC, x_prefix = block(
                    x_BLC, mod, mask, text=block_text, prefix=(x_prefix, prefix_mod, prefix_text)
                )
            if session is not None:
                x_BLC = session.block_output(i, x_BLC, 0, cfg.L)
        return self._head(x_BLC, self.head_nm.modulation(cond_BD))

    def query_groups(self) -> QueryGroups | torch.Tensor:
        """Teacher forcing's block-causal attention over the whole sequence, as ``QueryGroups``."""
        return QueryGroups.of(self.attn_bias_for_masking, self.config.begin_ends)

    def _check_control(self, control, B: int) -> None:
        if control is None:
            return
        cc, c = control.branch.config, self.config
        if (cc.depth, cc.embed_dim, cc.patch_nums) != (c.depth, c.C, c.patch_nums):
            raise ValueError(
                f"the control branch is for depth={cc.depth}, width={cc.embed_dim}, "
                f"patch_nums={cc.patch_nums}; this VAR has depth={c.depth}, width={c.C}, "
                f"patch_nums={c.patch_nums}"
            )
        if control.batch_size != B:
            raise ValueError(f"control holds {control.batch_size} samples, the batch has {B}")

    # ------------------------------------------------------------------------------------------ files
    @classmethod
    def load(cls, source, vae: nn.Module | None = None, **kwargs) -> VAR:
        """``Model.load`` (every file kind, ``ema=``, fine-tuning overrides) with ``vae`` attached; an
        official file takes the scale schedule of ``vae`` (or ``patch_nums=``; default: 256 px)."""
        if vae is not None:
            kwargs.setdefault("patch_nums", tuple(vae.config.patch_nums))
        model = super().load(source, **kwargs)
        return model.attach_vae(vae) if vae is not None else model

    @classmethod
    def from_official(
        cls, source, vae: nn.Module | None = None, patch_nums: tuple[int, ...] | None = None
    ) -> VAR:
        """An official VAR (``var_d16.pth`` ..., a path or its state_dict): depth, classes, vocabulary, Cvae,
        shared_aln and attn_l2_norm are read off the tensors; the scales are ``patch_nums`` or the VQVAE's."""
        return cls.load(source, vae, **({} if patch_nums is None else {"patch_nums": tuple(patch_nums)}))

    @classmethod
    def config_from_state_dict(cls, state_dict, source: str, patch_nums=None) -> VARConfig:
        return config_from_state_dict(state_dict, patch_nums or OFFICIAL_PATCH_NUMS, source)
