"""Multi-scale residual vector quantiser of VAR (Tian et al., 2024, Algorithm 1) with the phi convs.

f is quantised from the smallest scale to the largest: the residual is area-downsampled to pn x pn, each
position takes its nearest code (squared L2), the codes are bicubic-upsampled back to full size, passed
through phi(h) = (1 - r) h + r conv3x3(h), added to f_hat and subtracted from the residual. The last scale
has the full latent size and skips both resamplings. All of it runs in float32, also under autocast.

Legend: B batch, C = Cvae code channels, h w latent size, pn side of one scale, l = pn*pn tokens of one
scale, L all tokens, S scales, V vocabulary, N = B*l positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@lru_cache(maxsize=64)
def phi_index_map(num_scales: int, num_convs: int) -> tuple[int, ...]:
    """Which of ``num_convs`` phi convs each of ``num_scales`` scales uses (the official tick rule).

    Scale k sits at k / (S - 1) in [0, 1] and takes the conv whose tick is nearest, ticks being
    linspace(1/12, 11/12, 4) for 4 convs and linspace(1/(2K), 1 - 1/(2K), K) otherwise. The arithmetic is
    numpy's float64 linspace (i * step + start, last tick = stop) so exact ties resolve as in the official
    code (10 scales, 4 convs: scales 2 and 7 go to the later conv). A single scale sits at 1.0 (it is the
    full-resolution scale); the official code would divide by zero there.
    """
    if num_scales < 1 or num_convs < 1:
        raise ValueError(
            f"phi_index_map needs >= 1 scale and conv, got {num_scales} scales, {num_convs} convs"
        )
    K = num_convs
    start = 1 / 3 / K if K == 4 else 1 / 2 / K
    stop = 1 - start
    if K == 1:
        ticks = [start]
    else:
        step = (stop - start) / (K - 1)
        ticks = [i * step + start for i in range(K - 1)] + [stop]
    out = []
    for k in range(num_scales):
        at = k / (num_scales - 1) if num_scales > 1 else 1.0
        dist = [abs(t - at) for t in ticks]
        out.append(dist.index(min(dist)))  # first minimum, like np.argmin
    return tuple(out)


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual conv applied to each scale's upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.ratio) + super().forward(h_BChw).mul_(self.ratio)


class PhiBank(nn.Module):
    """The K phi convs shared by S scales, laid out like the official module for each sharing mode.

    share=0: one conv per scale, keys ``quant_resi.{k}``; share=1: one conv for all, ``quant_resi.qresi``;
    share>=2: ``share`` convs, ``quant_resi.qresi_ls.{k}`` (the official default is 4). A ratio of 0 makes
    phi the identity (no parameters).
    """

    def __init__(self, channels: int, ratio: float, share: int, num_convs: int):
        super().__init__()

        def make() -> nn.Module:
            return Phi(channels, ratio) if abs(ratio) > 1e-6 else nn.Identity()

        self.share = share
        if share == 1:
            self.qresi = make()
        elif share == 0:
            for k in range(num_convs):
                self.add_module(str(k), make())
        else:
            self.qresi_ls = nn.ModuleList(make() for _ in range(share))
        self.num_convs = 1 if share == 1 else (num_convs if share == 0 else share)

    def conv(self, k: int) -> nn.Module:
        if self.share == 1:
            return self.qresi
        if self.share == 0:
            return self._modules[str(k)]
        return self.qresi_ls[k]

    def index_map(self, num_scales: int) -> tuple[int, ...]:
        return phi_index_map(num_scales, self.num_convs)


class QuantizerOutput(NamedTuple):
    f_hat_BChw: torch.Tensor  # straight-through: value of f_hat, gradient of f
    vq_loss: torch.Tensor  # scalar
    hits_SV: torch.Tensor  # float (S, V) code counts of this batch


class MultiScaleQuantizer(nn.Module):
    """Residual quantiser over the scales ``patch_nums`` with one codebook (V, Cvae) shared by all scales."""

    def __init__(
        self,
        vocab_size: int,
        channels: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        using_znorm: bool = False,
    ):
        super().__init__()
        self.vocab_size, self.channels = vocab_size, channels
        self.patch_nums = tuple(patch_nums)
        self.beta, self.using_znorm = beta, using_znorm
        num_convs = default_qresi_counts or len(self.patch_nums)
        self.quant_resi = PhiBank(channels, quant_resi, share_quant_resi, num_convs)
        # training statistics only (EMA of code hits per scale); part of the official state_dict
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.num_hit_records = 0
        self.embedding = nn.Embedding(vocab_size, channels)

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, beta={self.beta}, znorm={self.using_znorm}"

    # ---------------------------------------------------------------- building blocks
    def phi(self, si: int, num_scales: int, h_BChw: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.conv(self.quant_resi.index_map(num_scales)[si])(h_BChw)

    def nearest(self, z_NC: torch.Tensor, e_sq_V: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the nearest code for each row of ``z_NC`` (first index on ties)."""
        codebook = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook, dim=-1).T, dim=1)
        if e_sq_V is None:
            e_sq_V = codebook.square().sum(1)
        # |z|^2 + |e|^2 - 2 z.e, in this order: the official rounding, so near-ties go the same way
        d_NV = torch.addmm(z_NC.square().sum(1, keepdim=True) + e_sq_V, z_NC, codebook.T, alpha=-2)
        return torch.argmin(d_NV, dim=1)

    def upsample_phi(
        self, si: int, num_scales: int, h_BChw: torch.Tensor, size: tuple[int, int], contiguous: bool = False
    ) -> torch.Tensor:
        """phi(bicubic(h) to the full latent size); the last scale is already full size.

        ``contiguous`` mirrors where the official code makes h contiguous before phi (quantisation, not the
        token paths): the conv's memory format changes its rounding, and this keeps results bitwise equal.
        """
        if si != num_scales - 1:
            h_BChw = F.interpolate(h_BChw, size=size, mode="bicubic", align_corners=False)
        return self.phi(si, num_scales, h_BChw.contiguous() if contiguous else h_BChw)

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.channels, pn, pn)  # (B, C, pn, pn)

    def new_fhat(self, B: int, size: int | None = None) -> torch.Tensor:
        """Zero f_hat (B, C, h, w) in float32 on the codebook's device (the start of accumulation).

        Accumulating onto a contiguous zero tensor, rather than starting from the first (channels-last)
        code map, keeps the memory format and hence the rounding of later convs equal to the official code.
        """
        size = size or self.patch_nums[-1]
        return self.embedding.weight.new_zeros(B, self.channels, size, size, dtype=torch.float32)

    @staticmethod
    def schedule_of(idx_list: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """Scale sides read off the token counts of ``idx_list`` (each l must be a square)."""
        pns = []
        for si, idx_Bl in enumerate(idx_list):
            l = idx_Bl.shape[1]
            pn = round(l**0.5)
            if pn * pn != l:
                raise ValueError(f"idx_list[{si}] has {l} tokens per image, not a square pn*pn")
            pns.append(pn)
        return tuple(pns)

    # ---------------------------------------------------------------- quantisation
    def f_to_idx_or_fhat(
        self, f_BChw: torch.Tensor, to_fhat: bool, patch_nums: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Quantise ``f`` scale by scale: the token indices (B, pn*pn) or the running f_hat (B, C, h, w)."""
        pns = tuple(patch_nums or self.patch_nums)
        B, C, H, W = f_BChw.shape
        if pns[-1] != H or pns[-1] != W:
            raise ValueError(
                f"the last scale {pns[-1]} must equal the latent size {H}x{W} (patch_nums={pns})"
            )
        S = len(pns)
        out = []
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f_rest = f_BChw.detach().to(torch.float32, copy=True)
            f_hat = torch.zeros_like(f_rest)
            e_sq_V = self.embedding.weight.detach().square().sum(1)
            for si, pn in enumerate(pns):
                rest = f_rest if si == S - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
                idx_N = self.nearest(rest.permute(0, 2, 3, 1).reshape(-1, C), e_sq_V)  # rows (b, y, x)
                code_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
                h_BChw = self.upsample_phi(si, S, code_BChw, (H, W), contiguous=True)
                f_rest.sub_(h_BChw.detach())
                if to_fhat:
                    f_hat = f_hat + h_BChw
                    out.append(f_hat)
                else:
                    out.append(idx_N.view(B, pn * pn))
        return out

    def forward(self, f_BChw: torch.Tensor) -> QuantizerOutput:
        """Training pass: straight-through f_hat, the mean over scales of the VQ loss, and code hits."""
        B, C, H, W = f_BChw.shape
        S = len(self.patch_nums)
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f = f_BChw.float()
            f_no_grad = f.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_no_grad)
            e_sq_V = self.embedding.weight.detach().square().sum(1)
            vq_loss = f.new_zeros(())
            hits = []
            for si, pn in enumerate(self.patch_nums):
                rest = f_rest if si == S - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
                idx_N = self.nearest(rest.permute(0, 2, 3, 1).reshape(-1, C), e_sq_V)
                hits.append(idx_N.bincount(minlength=self.vocab_size))
                code_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
                h_BChw = self.upsample_phi(si, S, code_BChw, (H, W), contiguous=True)
                f_hat = f_hat + h_BChw  # gradient to the codebook and phi
                f_rest.sub_(h_BChw.detach())  # only feeds argmin: no graph needed
                # commitment (to the encoder) + codebook (to codes and phi), as in the official trainer
                vq_loss = vq_loss + (
                    F.mse_loss(f_hat.detach(), f).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
                )
            vq_loss = vq_loss * (1.0 / S)
            f_hat = (f_hat.detach() - f_no_grad).add_(f)  # value f_hat, gradient to f
        return QuantizerOutput(f_hat, vq_loss, torch.stack(hits).float())

    # ---------------------------------------------------------------- from tokens
    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor], keep_all: bool = True) -> list[torch.Tensor]:
        """Running f_hat (B, C, h, w) after each scale (only the last one if not ``keep_all``)."""
        pns = self.schedule_of(idx_list)
        S, H = len(pns), pns[-1]
        out = []
        with torch.autocast(device_type=idx_list[0].device.type, enabled=False):
            f_hat = self.new_fhat(idx_list[0].shape[0], H)
            for si, (idx_Bl, pn) in enumerate(zip(idx_list, pns)):
                f_hat = f_hat + self.upsample_phi(si, S, self.embed(idx_Bl, pn), (H, H))
                if keep_all or si == S - 1:
                    out.append(f_hat)
        return out

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """VAR teacher-forcing input (B, L - first_l, C) float32: f_hat of scales < k, area-resized to k."""
        pns = self.schedule_of(idx_list)
        S, H = len(pns), pns[-1]
        B = idx_list[0].shape[0]
        if S == 1:
            return self.embedding.weight.new_zeros(B, 0, self.channels, dtype=torch.float32)
        nexts = []
        with torch.autocast(device_type=idx_list[0].device.type, enabled=False):
            f_hat = self.new_fhat(B, H)
            for si in range(S - 1):
                f_hat = f_hat + self.upsample_phi(si, S, self.embed(idx_list[si], pns[si]), (H, H))
                nxt = F.interpolate(f_hat, size=(pns[si + 1], pns[si + 1]), mode="area")
                nexts.append(nxt.view(B, self.channels, -1).transpose(1, 2))  # (B, l, C)
        return torch.cat(nexts, dim=1)  # (B, L - first_l, C)

    def ar_step(
        self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s codes ``h`` (B, C, pn, pn) to f_hat; return it and the next scale's input."""
        S = len(self.patch_nums)
        H = self.patch_nums[-1]
        with torch.autocast(device_type=h_BChw.device.type, enabled=False):
            h_BChw = h_BChw.float()
            if si != S - 1:
                h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic", align_corners=False)
            f_hat_BChw = f_hat_BChw + self.phi(si, S, h_BChw)
            if si == S - 1:
                return f_hat_BChw, f_hat_BChw
            pn = self.patch_nums[si + 1]
            return f_hat_BChw, F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")

    # ---------------------------------------------------------------- codebook maintenance
    @torch.no_grad()
    def record_hits(self, hits_SV: torch.Tensor) -> None:
        """Fold this step's (all-reduced) code counts into ``ema_vocab_hit_SV``.

        First call copies, then 0.9/0.1 for the first 100 calls, then 0.99/0.01. The official trainer
        counts calls per scale (so there only scale 0 copies); here a call updates all scales at once.
        """
        ema = self.ema_vocab_hit_SV
        if hits_SV.shape != ema.shape:
            raise ValueError(f"hits_SV has shape {tuple(hits_SV.shape)}, ema_vocab_hit_SV {tuple(ema.shape)}")
        hits_SV = hits_SV.to(ema)
        if self.num_hit_records == 0:
            ema.copy_(hits_SV)
        elif self.num_hit_records < 100:
            ema.mul_(0.9).add_(hits_SV.mul(0.1))
        else:
            ema.mul_(0.99).add_(hits_SV.mul(0.01))
        self.num_hit_records += 1

    @torch.no_grad()
    def restart_codes(self, code_idx: torch.Tensor, new_vectors: torch.Tensor) -> None:
        """Overwrite codebook rows ``code_idx`` (n,) with ``new_vectors`` (n, C) in place (dead codes); their
        hit EMA is set to the uniform rate of each scale, a grace period before they can count as dead."""
        weight = self.embedding.weight
        if code_idx.dim() != 1 or new_vectors.shape != (code_idx.shape[0], self.channels):
            raise ValueError(
                f"restart_codes: code_idx (n,) and new_vectors (n, {self.channels}) expected, "
                f"got {tuple(code_idx.shape)} and {tuple(new_vectors.shape)}"
            )
        code_idx = code_idx.to(weight.device)
        weight.index_copy_(0, code_idx, new_vectors.to(weight))
        ema = self.ema_vocab_hit_SV
        ema[:, code_idx] = (ema.sum(1, keepdim=True) / ema.shape[1]).expand(-1, code_idx.numel())

    @torch.no_grad()
    def residual_samples(self, f_BChw: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` vectors (n, C) that the quantiser sees, at scales drawn uniformly (to restart dead codes).

        Scale si sees f minus f_hat of the scales before it, area-resized to pn x pn; drawing the scale
        uniformly (not in proportion to pn^2) gives the small, collapse-prone scales their share.
        """
        f_BChw = f_BChw.float()
        fhat = self.f_to_idx_or_fhat(f_BChw, to_fhat=True)
        C, S = f_BChw.shape[1], len(self.patch_nums)
        scale_of_code = torch.randint(S, (n,), generator=generator)
        vectors = f_BChw.new_zeros(n, C)
        for si, pn in enumerate(self.patch_nums):
            picked = (scale_of_code == si).nonzero().flatten()
            if picked.numel() == 0:
                continue
            rest = f_BChw if si == 0 else f_BChw - fhat[si - 1]
            if si != S - 1:
                rest = F.interpolate(rest, size=(pn, pn), mode="area")
            rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)  # (B*pn*pn, C)
            rows = torch.randint(rest_NC.shape[0], (picked.numel(),), generator=generator)
            vectors[picked.to(vectors.device)] = rest_NC[rows.to(rest_NC.device)]
        return vectors

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # a file trained with another number of scales: start our own statistics (the official rule); torch
        # hands this hook a copy of the caller's dict, so replacing the entry is local. Zeros are made on the
        # file's device, not from our buffer, which is on the meta device when loading assigns (lifecycle.py).
        key = prefix + "ema_vocab_hit_SV"
        loaded = state_dict.get(key)
        if loaded is not None and loaded.shape[0] != self.ema_vocab_hit_SV.shape[0]:
            loaded = state_dict[key] = torch.zeros(
                self.ema_vocab_hit_SV.shape, dtype=loaded.dtype, device=loaded.device
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        # the call count is not stored: statistics that were loaded count as warmed up
        warm = loaded is not None and not loaded.is_meta and bool(loaded.any())
        self.num_hit_records = 100 if warm else 0
