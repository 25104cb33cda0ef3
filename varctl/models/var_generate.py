"""Sampling from VAR: next-scale prediction with a KV cache and classifier-free guidance (Tian et al.,
"Visual Autoregressive Modeling", 2024, sec. 4; the official ``autoregressive_infer_cfg``).

``GenerateMixin`` gives the VAR module its ``generate``; it uses the module's embeddings, blocks and head
(``VAR`` in var.py) and keeps the network file free of the sampling loop, as ``GenerationMixin`` does in
Hugging Face transformers.

Legend: B batch, l tokens of one scale, C width, D condition width, V vocabulary, Cv = Cvae code channels,
K scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from varctl.models.sampling import (
    check_sampling_args,
    filter_logits,
    guidance_schedule,
    make_generator,
    per_scale,
    sample_tokens,
    smooth_embedding,
)
from varctl.models.text import TextCondition
from varctl.models.token_pruning import PruningPlan, TokenPruning
from varctl.models.var_config import check_vae_fits
from varctl.models.var_runner import ScaleRunner, check_refiner


@dataclass
class Known:
    """Zero-shot in-painting, out-painting and editing (VAR, sec. 7): the region to keep is taken from the
    tokenizer's encoding of an input image at every scale, and the model draws only the rest.

    ``fhats``: the input's running f_hat after each scale (``vae.img_to_fhat``), each (B, Cv, h, w);
    ``keep``: (B, 1, h, w), 1 where the latent is kept, 0 where it is drawn. After each scale,
    ``generate`` sets f_hat to the input's inside ``keep``, so the next scale sees the input there and the
    final latent equals the input's there. In pixels the decoder, which sees the whole latent, changes the
    kept region by what was drawn beside it; generation jobs paste the input's pixels back
    (``varctl.lit.jobs.paste_input``).
    """

    fhats: list[torch.Tensor]
    keep: torch.Tensor

    @classmethod
    @torch.no_grad()
    def from_image(cls, vae: nn.Module, images: torch.Tensor, redraw: torch.Tensor, patch_nums=None) -> Known:
        """``images`` (B, 3, H, W) in [-1, 1]; ``redraw`` (B, 1, H, W), > 0 where new content is drawn. A
        latent cell is kept only when none of its pixels is to be redrawn."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Known.from_image: images must be (B, 3, H, W), found {tuple(images.shape)}")
        if redraw.dim() != 4 or redraw.shape[1] != 1 or redraw.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"Known.from_image: the mask must be (B, 1, {images.shape[-2]}, {images.shape[-1]}) like the "
                f"images, found {tuple(redraw.shape)}"
            )
        with torch.autocast(images.device.type, enabled=False):
            fhats = [f.float() for f in vae.img_to_fhat(images.float(), patch_nums=patch_nums)]
        h = fhats[-1].shape[-1]
        hole = F.adaptive_max_pool2d((redraw > 0).float(), (h, h))
        return cls(fhats, 1.0 - hole)


def _generators(device, seed, B: int) -> list[torch.Generator] | torch.Generator:
    """One generator for the call, or one per sample when ``seed`` is a list (then a sample's tokens do not
    depend on the other samples of the batch)."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != B:
            raise ValueError(f"seed: a per-sample list needs {B} values, found {len(seed)}")
        return [make_generator(device, int(s)) for s in seed]
    return make_generator(device, seed)


class GenerateMixin:
    """``generate`` and its helpers for ``VAR``."""

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
        control=None,
        control_cfg=0.0,
        control_strength=1.0,
        known: Known | None = None,
        token_pruning=None,
        skip_guidance_from: int | None = None,
        refiner: nn.Module | None = None,
        draft_scales: int | None = None,
        refiner_control=None,
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
            seed: seeds this call's own generator (the global RNG is neither used nor changed); None: random;
                a list of B seeds: one generator per sample, whose tokens then do not depend on the batch.
            return_intermediates: also return the K images decoded from f_hat after each scale.
            vae: the VQVAE to decode with; default the attached one.
            callback: called as ``callback(si, logits_BlV, idx_Bl, f_hat_BChw)`` after each scale with the
                guided logits (before temperature and filtering), the sampled tokens and the running f_hat.
            control: ``ControlBranch.encode(maps)`` for B samples (its injector acts in the conditional and
                the null-class half alike), or None.
            control_cfg: control guidance (scalar or per scale): with c > 0 a third, control-dropped copy
                (the condition with the null control) joins, and the mixed logits become
                (1 + t + c) * full - t * null class - c * control dropped.
            control_strength: the control's strength (scalar or per scale; 0 switches it off at a scale).
            known: the region kept from an input image (in-painting, out-painting, editing; ``Known``).

            Fast samplers, each off by default and each changing the samples on purpose (README, "Fast
            sampling"):
            token_pruning: FastVAR's cached token pruning: the share of tokens left out of the middle blocks'
                layers at the last two scales (e.g. 0.5), or a ``TokenPruning`` / dict of its fields.
            skip_guidance_from: a scale index from which the guidance copies are dropped and the conditional
                rows run alone (guidance and control guidance off there; a control session keeps those rows).
            refiner: a smaller VAR (same tokenizer, scales and conditions) that draws the scales from
                ``draft_scales`` on, after teacher-forcing the drawn ones (CoDe's drafter and refiner).
            refiner_control: under ``control``, the refiner's own control branch's ``encode`` of the same maps
                (``ControlledVAR.generate`` makes it when its refiner is a ControlledVAR).
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
        self._check_control(control, B)
        cs = per_scale(control_cfg, K, "control_cfg") if control is not None else [0.0] * K
        if control is None and (control_cfg != 0.0 or control_strength != 1.0):
            raise ValueError("control_cfg and control_strength need control= (a ControlBranch.encode)")
        guided = any(t != 0 for t in ts)  # without guidance the null half is never needed
        control_guided = any(v != 0 for v in cs)  # a control-dropped copy for control guidance
        parts = [cond]
        if guided:
            parts.append(self.null_condition(B))
        if control_guided:
            parts.append(cond)
        if len(parts) > 1:
            if isinstance(cond, TextCondition):
                for part in parts[1:]:
                    cond = cond.cat(part)
            else:
                cond = torch.cat(parts)
        device = self.lvl_1L.device
        generator = _generators(device, seed, B)
        if known is not None and (known.keep.shape[0] != B or len(known.fhats) != K):
            raise ValueError(
                f"known: expected {K} f_hats and a mask for {B} samples, found {len(known.fhats)} f_hats and "
                f"{known.keep.shape[0]} masks"
            )
        pruning = TokenPruning.of(token_pruning)
        skip_from = K if skip_guidance_from is None else int(skip_guidance_from)
        if not 0 <= skip_from <= K:
            raise ValueError(
                f"skip_guidance_from must be a scale index in [0, {K}], found {skip_guidance_from}"
            )
        if refiner is not None:
            check_refiner(self, refiner, draft_scales)
            if control is not None and refiner_control is None:
                raise ValueError(
                    "a refiner under control needs a control branch of its own: refiner_control= (a "
                    "ControlledVAR as ControlledVAR.generate's refiner)"
                )
            refiner._check_control(refiner_control, B)
            if pruning is not None and draft_scales > K - pruning.scales - 1:
                raise ValueError(
                    f"token_pruning with a refiner: draft_scales={draft_scales} must be <= "
                    f"{K - pruning.scales - 1}, so that the refiner runs the reference scale"
                )
        if refiner_control is not None and (control is None or refiner is None):
            raise ValueError("refiner_control needs control= and refiner=")

        # everything that depends only on the condition is computed once per call, not once per scale
        rows = refiner_rows = None
        if control is not None:  # the rows' control: each part's copy of its sample's, dropped in the last
            index = torch.arange(B, device=device).repeat(len(parts))
            keep = torch.ones(len(parts) * B, device=device)
            if control_guided:
                keep[-B:] = 0
            strength = per_scale(control_strength, K, "control_strength")
            strength = None if all(v == 1 for v in strength) else strength
            rows = control.with_strength(strength).rows(index, keep)
            if refiner_control is not None:
                refiner_rows = refiner_control.with_strength(strength).rows(index, keep)
        runner = ScaleRunner(self, cond, B, rows, _plan(pruning, self))
        codebook_VC = vae.quantize.embedding.weight
        x_RlC = runner.start()
        codes = []  # each later scale's (B, l, Cv) input, for a refiner's prefill
        f_hat = codebook_VC.new_zeros(B, c.z_channels, c.patch_nums[-1], c.patch_nums[-1])
        intermediates = []
        for si, pn in enumerate(c.patch_nums):
            ratio = si / (K - 1) if K > 1 else 0.0
            if si == skip_from and runner.R > B:  # guidance skipped from here on: the copies' rows go
                runner.keep_rows(B)
                x_RlC = x_RlC[:B]
            if refiner is not None and si == draft_scales:  # the refiner takes over, after a prefill
                runner = ScaleRunner(refiner, cond, B, refiner_rows, _plan(pruning, refiner))
                if si >= skip_from:
                    runner.keep_rows(B)
                runner.prefill([runner.start()] + [runner.embed(k + 1, x) for k, x in enumerate(codes[:-1])])
                x_RlC = runner.embed(si, codes[-1])
            x_RlC = runner.run(si, x_RlC)
            weights = [1.0]  # the mix of the parts' head inputs: full, null class, control dropped
            if runner.R > B:
                if guided:
                    weights = [1.0 + ts[si], -ts[si]]
                if control_guided:
                    weights = [weights[0] + cs[si], *weights[1:], -cs[si]]
            logits_BlV = runner.logits(x_RlC, weights)
            if not bool(torch.isfinite(logits_BlV).all()):
                raise _nonfinite_logits(runner.var, si, pn, logits_BlV)
            sample_logits = logits_BlV if temps[si] == 1 else logits_BlV / temps[si]
            sample_logits = filter_logits(sample_logits, int(top_ks[si]), float(top_ps[si]))
            idx_Bl = _per_sample(sample_tokens, generator, sample_logits)
            if more_smooth:  # after the tokens, same generator, filtered logits: as the official sampler
                h_BlCv = _per_sample(
                    lambda lg, g, r=ratio: smooth_embedding(lg, codebook_VC, r, g), generator, sample_logits
                )
            else:
                h_BlCv = F.embedding(idx_Bl, codebook_VC)
            h_BChw = h_BlCv.transpose(1, 2).reshape(B, c.z_channels, pn, pn)
            f_hat, next_BChw = vae.ar_step(si, f_hat, h_BChw)
            if known is not None:  # the kept region from the input, the drawn one from the samples
                f_hat = torch.lerp(f_hat, known.fhats[si].to(f_hat), known.keep.to(f_hat))
                if si < K - 1:
                    nxt = c.patch_nums[si + 1]
                    next_BChw = F.interpolate(f_hat, size=(nxt, nxt), mode="area")
            if callback is not None:
                callback(si, logits_BlV, idx_Bl, f_hat)
            if si == K - 1:
                break
            if return_intermediates:
                intermediates.append(vae.fhat_to_img(f_hat).float().add_(1).mul_(0.5))
            next_BlCv = next_BChw.reshape(B, c.z_channels, -1).transpose(1, 2)  # (B, l, Cv)
            if refiner is not None and si < draft_scales:
                codes.append(next_BlCv)
            x_RlC = runner.embed(si + 1, next_BlCv)
        # the KV caches (the largest buffers of the loop) are freed before the decoder's activations exist
        del runner, x_RlC, logits_BlV, sample_logits
        images = vae.fhat_to_img(f_hat).float().add_(1).mul_(0.5)
        if return_intermediates:
            return images, intermediates + [images]
        return images

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

    def _guided_logits(
        self, x_BlC: torch.Tensor, head_mod: torch.Tensor, B: int, weights: list[float]
    ) -> torch.Tensor:
        """sum_j w_j * logits of part j for one scale, (B, l, V) float32; the parts are the B-row copies
        (full, null class, control dropped) and the weights sum to 1, e.g. (1 + t) * cond - t * uncond.

        The head's Linear is affine, so the mix is taken on its input: one head matmul for B rows, not 2B;
        parts with weight 0 skip the head altogether.
        """
        if all(w == 0 for w in weights[1:]):
            return self._head(x_BlC[:B], head_mod[:B])
        dtype = self.head.weight.dtype
        h_BlC = self.head_nm(x_BlC.to(dtype), head_mod).to(dtype)
        mixed = weights[0] * h_BlC[:B]
        for j, w in enumerate(weights[1:], start=1):
            if w != 0:
                mixed = mixed - (-w) * h_BlC[j * B : (j + 1) * B]
        return self.head(mixed).float()

    def _sampling_vae(self, vae: nn.Module | None) -> nn.Module:
        if vae is None:
            if self.vae is None:
                raise RuntimeError("generate needs a VQVAE: pass vae= or call var.attach_vae(vae) first")
            return self.vae
        if vae is not self.vae:
            check_vae_fits(self.config, vae)
        return vae


def _plan(pruning: TokenPruning | None, var) -> PruningPlan | None:
    return None if pruning is None else PruningPlan(pruning, var.config.patch_nums, var.config.depth)


def _per_sample(fn, generator, logits_BlV: torch.Tensor) -> torch.Tensor:
    """``fn(logits, generator)`` for the batch, or row by row with one generator per sample."""
    if isinstance(generator, torch.Generator):
        return fn(logits_BlV, generator)
    return torch.cat([fn(logits_BlV[i : i + 1], g) for i, g in enumerate(generator)])


def _nonfinite_logits(model: nn.Module, si: int, pn: int, logits_BlV: torch.Tensor) -> Exception:
    """The error for NaN/inf logits at scale ``si``, naming the cause: weights that are not finite (a diverged
    run's checkpoint) or, with finite weights, the inputs or the guidance."""
    from varctl.checkpoints import NonFiniteError, nonfinite_tensors, short_list

    n = int((~torch.isfinite(logits_BlV)).sum())
    where = f"sampling: {n} logits at scale {si} ({pn}x{pn}) are NaN or inf"
    bad = nonfinite_tensors(dict(model.named_parameters()))  # buffers hold -inf masks on purpose
    if bad:
        return NonFiniteError(
            f"{where}: the model's weights are not finite ({short_list(bad)}); the checkpoint comes from a "
            f"diverged run, sample from an earlier checkpoint"
        )
    return NonFiniteError(
        f"{where}, with finite weights: check the conditions and control maps given (NaN or inf values) and "
        f"the guidance scales"
    )
