"""Building blocks of the VAR transformer (Tian et al., "Visual Autoregressive Modeling", 2024, section 3.3).

A block is AdaLN-modulated pre-norm self-attention plus an FFN (DiT-style, with six modulation vectors
gamma1, gamma2, scale1, scale2, shift1, shift2). Attention L2-normalises q and k per head and multiplies q by
a learned, clamped per-head temperature. Text models add a cross-attention layer after self-attention.
Module and parameter names equal the official ones, so official state_dicts load without conversion.

Legend: B batch, L tokens in the sequence (all scales, or one scale while sampling), T text tokens,
C width, D condition width, H heads, c head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.kernels import Linear, linear

MAX_SCALE_MUL = math.log(100.0)  # the learned attention temperature is clamped at 100


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample in training, rescaled by 1/keep."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled() and h.requires_grad:
            h = self.act(h)  # its backward needs its input
        else:  # in place: at the last scales of sampling a fresh (B, L, 4C) map costs as much as the GELU
            h = torch.ops.aten.gelu_(h, approximate="tanh")
        return self.drop(self.fc2(h))


class KVCache:
    """Keys and values of the scales sampled so far, preallocated to the full sequence length.

    One per attention layer and per ``generate`` call; storage is allocated on the first append (so batch,
    dtype and device follow the activations, autocast included) and written in place afterwards.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.len = 0
        self.k = self.v = None
        self.consts = None  # the layer's [q_bias, 0, v_bias] and q scale, built once per call

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, l, c = k_BHlc.shape
        if self.k is None:
            self.k = k_BHlc.new_empty(B, H, self.max_len, c)
            self.v = v_BHlc.new_empty(B, H, self.max_len, c)
        end = self.len + l
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.k[:, :, self.len : end] = k_BHlc
        self.v[:, :, self.len : end] = v_BHlc
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep_rows(self, n: int) -> None:
        """Keep the first ``n`` rows (a view: the first rows of a contiguous tensor stay contiguous)."""
        if self.k is not None:
            self.k, self.v = self.k[:n], self.v[:n]


class PrefixKV:
    """One layer's keys and values of a prefix that attends only to itself (prefill's control tokens), from a
    pass of the prefix alone, that the tokens then attend to before their own: ``KVCache``'s interface, the
    first ``append`` (the prefix's pass) keeping its keys and values, the later ones returning them put
    before the new ones (a concatenation, so teacher forcing's gradients reach the prefix)."""

    def __init__(self):
        self.k = self.v = None
        self.consts = None

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k_BHlc, v_BHlc
            return k_BHlc, v_BHlc
        return torch.cat((self.k, k_BHlc), dim=2), torch.cat((self.v, v_BHlc), dim=2)


class QueryGroups(tuple):
    """Teacher forcing's block-causal attention, computed by groups of query rows: ((begin, end, bias), ...).

    The queries [begin, end) of a group attend to the keys [0, end) only: no token sees a later scale, so the
    keys past the group's end would only be masked out. Each scale of ``MIN_TOKENS`` tokens or more is a group
    of its own and needs no bias at all (it sees all of its keys); the smaller scales before it form one group
    with the slice of the block-causal bias. At VAR-d16's 680 tokens this computes 63 % of the score matrix
    that one masked call computes, and the large groups go to the mask-free attention kernels. The result
    equals the masked attention's up to float rounding (different summation lengths). In training the group
    outputs and their concatenation are both kept for the backward pass: one (B, L, C) map more per block."""

    MIN_TOKENS = 64

    @classmethod
    def of(cls, mask_11LL: torch.Tensor, begin_ends) -> QueryGroups | torch.Tensor:
        """Groups for the scales ``begin_ends`` under their block-causal bias ``mask_11LL``; the bias itself
        where there would be only one group (small schedules: the call is the same)."""
        groups, start = [], 0
        for begin, end in begin_ends:
            if end - begin < cls.MIN_TOKENS:
                continue
            if begin > start:  # the small scales before this one, together
                groups.append((start, begin, mask_11LL[:, :, start:begin, :begin]))
            groups.append((begin, end, None))
            start = end
        L = mask_11LL.shape[-1]
        if start < L:
            groups.append((start, L, mask_11LL[:, :, start:, :]))
        return mask_11LL if len(groups) == 1 else cls(groups)


class _Prefixes(torch.autograd.Function):
    """The prefixes ``x[:, :, :e]`` for each ``e`` of ``ends`` (views), whose backward adds each one's
    gradient into its slice of one zero map. Autograd's own slices would each fill a zero map of all of ``x``,
    then sum the maps. (At VAR-d16's groups, this and the queries' split make the attention's forward and
    backward 1.1x faster on the CPU, with the gradients equal to float rounding.)"""

    @staticmethod
    def forward(ctx, x, ends):
        ctx.ends, ctx.shape = ends, x.shape
        return tuple(x[:, :, :e] for e in ends)

    @staticmethod
    def backward(ctx, *grads):
        out = grads[0].new_zeros(ctx.shape)
        for e, g in zip(ctx.ends, grads):
            out[:, :, :e] += g
        return out, None


def attention(q, k, v, attn_bias, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention of q, k, v (B, H, L, c) under ``attn_bias`` (a tensor, None or
    ``QueryGroups``), returned as (B, L, H, c)."""

    def sdpa(q, k, v, bias):
        bias = None if bias is None else bias.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2)

    if not isinstance(attn_bias, QueryGroups):
        return sdpa(q, k, v, attn_bias)
    # the groups partition the queries (one split, whose backward is one concatenation) and read prefixes of
    # the keys and values (_Prefixes while training)
    qs = q.split([e - b for b, e, _ in attn_bias], dim=2)
    ends = tuple(e for _, e, _ in attn_bias)
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        ks, vs = _Prefixes.apply(k, ends), _Prefixes.apply(v, ends)
    else:
        ks, vs = [k[:, :, :e] for e in ends], [v[:, :, :e] for e in ends]
    return torch.cat([sdpa(*qkv, bias) for *qkv, (_, _, bias) in zip(qs, ks, vs, attn_bias)], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with L2-normalised q/k, learned per-head scale and a zero k bias."""

    def __init__(
        self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, l2_norm=True
    ):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # k needs no bias: softmax is shift-invariant
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def constants(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The qkv bias [q_bias, 0, v_bias] and the per-head q scale (1, H, 1, 1); fixed during sampling."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        return bias, self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp() if self.l2_norm else None

    def forward(
        self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        if cache is None:
            bias, q_scale = self.constants()
        else:
            if cache.consts is None:
                cache.consts = self.constants()
            bias, q_scale = cache.consts
        qkv = linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, c)
        if self.l2_norm:
            # F.normalize(q) * scale with one pass over q: q * (scale / |q|)
            q = q * q_scale.div(q.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            k = F.normalize(k, dim=-1)
        # under autocast the norms run in float32 while v is half precision; SDPA wants one dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:  # sampling: one whole scale per step sees itself and all earlier scales
            k, v = cache.append(k, v)
        out_BLHc = attention(q, k, v, attn_bias, self.attn_drop if self.training else 0.0, self.scale)
        return self.proj_drop(self.proj(out_BLHc.reshape(B, L, C)))  # (B, L, C), heads head-major

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, l2_norm={self.l2_norm}"


class CrossAttention(nn.Module):
    """Attention from image tokens (queries) to text tokens (keys/values) with a key padding mask.

    ``proj`` is zero-initialised by ``VAR.init_weights`` so a fresh text model behaves as the class model.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def context(self, ctx_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text tokens, (B, H, T, c) each; constant over a whole sampling call."""
        B, T, C = ctx_BTC.shape
        kv = self.to_kv(ctx_BTC).view(B, T, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self, x_BLC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias_B11T: torch.Tensor
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q = self.to_q(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, c)
        k, v = kv
        out = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=bias_B11T.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


def key_padding_bias(mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (B, 1, 1, T) bias from a bool mask (True = real token) and a (B, 1, 1) "has tokens" gate.

    A row without any real token would give NaN in softmax: it attends to everything and is gated to zero.
    """
    has_any = mask_BT.any(dim=-1)
    keep = mask_BT | ~has_any[:, None]
    bias = torch.zeros(keep.shape, dtype=torch.float32, device=mask_BT.device).masked_fill_(~keep, -torch.inf)
    return bias[:, None, None, :], has_any.float()[:, None, None]


def block_context(block: nn.Module, text: tuple | None) -> tuple | None:
    """A block's ``text`` argument from the VAR's (ctx_BTC, bias, gate): the context's keys and values
    through the block's cross-attention; None without text."""
    return None if text is None else (block.cross_attn.context(text[0]), *text[1:])


def text_rows(text, n: int):
    """A block's sampling text ``((k, v), bias, gate)`` (``CrossAttention.context`` of the tokens and
    ``key_padding_bias``) for its first ``n`` rows; None stays None."""
    if text is None:
        return None
    (k, v), bias, gate = text
    return (k[:n], v[:n]), bias[:n], gate[:n]


class AdaLNBlock(nn.Module):
    """x += gamma1 * Attn(LN(x)(1+scale1)+shift1); [x += CrossAttn(LN(x), text)]; x += gamma2 * FFN(...)."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        cross_attn: bool = False,
    ):
        super().__init__()
        self.C = dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(dim, num_heads, attn_drop, drop, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:  # per-block offsets added to one shared modulation
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        if cross_attn:  # registered last so class models keep the official key order
            self.ln_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_attn = CrossAttention(dim, num_heads, attn_drop)
        else:
            self.cross_attn = None

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C): gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2. ``cond`` is cond_BD, or the
        shared (B, 1, 6, C) modulation when ``shared_aln``. Depends on the condition only, so sampling
        computes it once per call."""
        mod = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.C)
        return mod + mod.new_tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0]).view(1, 1, 6, 1)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.drop_path, DropPath):
            return x + self.drop_path(branch * gamma)
        return torch.addcmul(x, branch, gamma)  # x + gamma * branch in one pass

    def forward(
        self,
        x_BLC: torch.Tensor,
        mod_B16C: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        text: tuple | None = None,
        prune=None,
        prefix: tuple | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``text``: (kv, bias_B11T, gate_B11) from ``CrossAttention.context`` and ``key_padding_bias``.
        ``prune``: sampling's token pruning at this block and scale (token_pruning.py), or None.
        ``prefix``: (x, modulation, text) of tokens that attend only to each other and that x attends to
        before itself (``attn_bias`` covering them first; prefill's control in teacher forcing): they pass
        through this block first, in the same call (a sharded block gathers its parameters once, and both
        outputs are the call's), and the call returns (x, the prefix's x)."""
        if prefix is not None:
            kv = PrefixKV()
            x_prefix = self.forward(prefix[0], prefix[1], None, cache=kv, text=prefix[2])
            return self.forward(x_BLC, mod_B16C, attn_bias, cache=kv, text=text), x_prefix
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(
            2
        )  # 6 x (B, 1, C), scales hold 1 + s

        def attn(x):
            return self.attn(
                torch.addcmul(shift1, self.ln_wo_grad(x), scale1), attn_bias=attn_bias, cache=cache
            )

        def ffn(x):
            return self.ffn(torch.addcmul(shift2, self.ln_wo_grad(x), scale2))

        x_BLC = self._residual(x_BLC, attn(x_BLC) if prune is None else prune(attn, x_BLC, "attn"), gamma1)
        if self.cross_attn is not None:
            kv, bias_B11T, gate_B11 = text

            def cross(x):
                return self.cross_attn(self.ln_cross(x), kv, bias_B11T)

            out = cross(x_BLC) if prune is None else prune(cross, x_BLC, "cross")
            x_BLC = x_BLC + self.drop_path(out * gate_B11.to(out.dtype))
        return self._residual(x_BLC, ffn(x_BLC) if prune is None else prune(ffn, x_BLC, "ffn"), gamma2)


class AdaLNHead(nn.Module):
    """LN(x) * (1 + scale) + shift before the output Linear; scale, shift from the condition."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, 1, 2, C): 1 + scale, shift."""
        mod = self.ada_lin(cond_BD).view(-1, 1, 2, self.C)
        return mod + mod.new_tensor([1.0, 0.0]).view(1, 1, 2, 1)

    def forward(self, x_BLC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = mod_B12C.unbind(2)
        return torch.addcmul(shift, self.ln_wo_grad(x_BLC), scale)


class SharedAdaLin(nn.Linear):
    """One D -> 6C modulation for all blocks (``shared_aln=True``), viewed as (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)
